"""`python -m csx_referrals.migrate`: bring the referrals database to the latest schema, then exit."""

from pathlib import Path

from csx_common.migrations import main

if __name__ == "__main__":
    main("referrals", Path(__file__).parent / "migrations")
