"""Working days in England and Wales: weekends and bank holidays (subdivision ENG) excluded.

Statutory timescales (DESIGN.md §2) count working days; the services name the rule, this module
only counts.
"""

from __future__ import annotations

from datetime import date, timedelta
from functools import cache

import holidays


@cache
def _bank_holidays(year: int) -> holidays.HolidayBase:
    return holidays.country_holidays("GB", subdiv="ENG", years=year)


def is_working_day(day: date) -> bool:
    return day.weekday() < 5 and day not in _bank_holidays(day.year)


def add_working_days(start: date, days: int) -> date:
    """The date `days` working days after `start` (start itself does not count)."""
    if days < 0:
        raise ValueError("days must be >= 0")
    current = start
    while days:
        current += timedelta(days=1)
        if is_working_day(current):
            days -= 1
    return current
