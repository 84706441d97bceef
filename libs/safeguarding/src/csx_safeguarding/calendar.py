"""Working days in England and Wales: weekends and bank holidays (subdivision ENG) excluded.

Statutory timescales (docs/process.md, the domain rules) count working days; the services name
the rule, this module only counts. Every due date is counted from a date on the London calendar:
an instant (a concern recorded at 00:30 BST) belongs to the London day it happened on, never to the
UTC day, so `add_working_days` takes an aware datetime as well as a date and converts it here.
"""

from __future__ import annotations

import calendar
from datetime import date, datetime, timedelta
from functools import cache
from zoneinfo import ZoneInfo

import holidays


@cache
def _bank_holidays(year: int) -> holidays.HolidayBase:
    return holidays.country_holidays("GB", subdiv="ENG", years=year)


def is_working_day(day: date) -> bool:
    return day.weekday() < 5 and day not in _bank_holidays(day.year)


LONDON = ZoneInfo("Europe/London")


def london_date(moment: datetime) -> date:
    """The date of `moment` in England (GMT or BST); a naive datetime is refused, not guessed at."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("moment must be timezone-aware")
    return moment.astimezone(LONDON).date()


def add_working_days(start: date | datetime, days: int) -> date:
    """The date `days` working days after `start` (start itself does not count); an instant counts
    from its London date."""
    if days < 0:
        raise ValueError("days must be >= 0")
    current = london_date(start) if isinstance(start, datetime) else start
    while days:
        current += timedelta(days=1)
        if is_working_day(current):
            days -= 1
    return current


def add_months(start: date, months: int) -> date:
    """The same day `months` calendar months later (the month's last day when it is shorter)."""
    year, month = divmod(start.month - 1 + months, 12)
    year += start.year
    return date(year, month + 1, min(start.day, calendar.monthrange(year, month + 1)[1]))


def working_day_on_or_before(day: date) -> date:
    """`day`, or the last working day before it: a date "within" a period falls on a working day."""
    while not is_working_day(day):
        day -= timedelta(days=1)
    return day
