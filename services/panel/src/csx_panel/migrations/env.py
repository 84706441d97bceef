from csx_common.migrations import run_env
from csx_panel.tables import metadata

run_env(metadata)
