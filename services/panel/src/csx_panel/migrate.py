"""`python -m csx_panel.migrate`: bring the panel database to the latest schema, then exit."""

from pathlib import Path

from csx_common.migrations import main

if __name__ == "__main__":
    main("panel", Path(__file__).parent / "migrations")
