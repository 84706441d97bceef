from csx_common.migrations import run_env
from csx_actionplans.tables import metadata

run_env(metadata)
