"""The kernel's Alembic environment, for `tools/migrations.py kernel ...` only: services run the
kernel's revisions from their own environments. The caller hands in the target metadata (the
kernel's table factories, some of which live outside csx_common)."""

from alembic import context

from csx_common.migrations import run_env

run_env(context.config.attributes["metadata"])
