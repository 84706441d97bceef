"""`python -m csx_conferences.migrate`: bring the conferences database to the latest schema, then exit."""

from pathlib import Path

from csx_common.migrations import main

if __name__ == "__main__":
    main("conferences", Path(__file__).parent / "migrations")
