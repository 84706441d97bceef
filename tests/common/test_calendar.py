from datetime import date

import pytest

from csx_common.calendar import add_working_days, is_working_day


@pytest.mark.parametrize(
    ("start", "days", "expected"),
    [
        (date(2026, 11, 27), 1, date(2026, 11, 30)),  # Friday -> Monday
        (date(2026, 12, 24), 1, date(2026, 12, 29)),  # Christmas, Boxing Day (substitute 28th)
        (date(2020, 11, 9), 15, date(2020, 11, 30)),  # the pilot's start
        (date(2026, 4, 2), 1, date(2026, 4, 7)),  # Good Friday and Easter Monday
    ],
)
def test_add_working_days(start: date, days: int, expected: date) -> None:
    assert add_working_days(start, days) == expected


def test_bank_holidays_are_england_and_wales() -> None:
    assert not is_working_day(date(2026, 8, 31))  # summer bank holiday in England
    assert is_working_day(date(2026, 8, 3))  # Scotland's summer holiday is a working day here
