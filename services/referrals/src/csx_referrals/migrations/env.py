from csx_common.migrations import run_env
from csx_referrals.tables import metadata

run_env(metadata)
