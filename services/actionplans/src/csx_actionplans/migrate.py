"""`python -m csx_actionplans.migrate`: bring the actionplans database to the latest schema, then exit."""

from pathlib import Path

from csx_common.migrations import main

if __name__ == "__main__":
    main("actionplans", Path(__file__).parent / "migrations")
