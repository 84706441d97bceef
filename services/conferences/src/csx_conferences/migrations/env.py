from csx_common.migrations import run_env
from csx_conferences.tables import metadata

run_env(metadata)
