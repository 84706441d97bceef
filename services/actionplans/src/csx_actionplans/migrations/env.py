from csx_actionplans.tables import metadata
from csx_common.migrations import run_env

run_env(metadata)
