from datetime import date

import pytest

from csx_safeguarding.calendar import add_working_days, is_working_day


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


# One calendar for every due date: an instant counts from its London date -------------------------

from datetime import UTC, datetime, timedelta  # noqa: E402
from zoneinfo import ZoneInfo  # noqa: E402

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from csx_safeguarding.calendar import london_date  # noqa: E402

LONDON = ZoneInfo("Europe/London")
# The changeovers of 2025-2027 (last Sunday of March and October, 01:00 UTC).
CHANGEOVERS = [
    datetime(2025, 3, 30, 1, tzinfo=UTC),
    datetime(2025, 10, 26, 1, tzinfo=UTC),
    datetime(2026, 3, 29, 1, tzinfo=UTC),
    datetime(2026, 10, 25, 1, tzinfo=UTC),
    datetime(2027, 3, 28, 1, tzinfo=UTC),
    datetime(2027, 10, 31, 1, tzinfo=UTC),
]


def _london_midnights() -> list[datetime]:
    """London midnight (as UTC) on every day from 2025 to 2027, summer and winter."""
    day, out = date(2025, 1, 1), []
    while day < date(2028, 1, 1):
        out.append(datetime(day.year, day.month, day.day, tzinfo=LONDON).astimezone(UTC))
        day += timedelta(days=1)
    return out


# Instants that matter: either side of each changeover and of London midnight (which is 23:00 UTC
# the day before in summer time).
NEAR = st.sampled_from(CHANGEOVERS + _london_midnights()).flatmap(
    lambda at: st.integers(min_value=-7200, max_value=7200).map(lambda s: at + timedelta(seconds=s))
)


@given(NEAR, st.integers(min_value=0, max_value=20))
def test_an_instant_counts_from_its_london_date(moment: datetime, days: int) -> None:
    local = moment.astimezone(LONDON)
    assert london_date(moment) == local.date()
    assert add_working_days(moment, days) == add_working_days(local.date(), days)
    # The same instant written in any offset is the same London day.
    assert add_working_days(moment.astimezone(ZoneInfo("America/New_York")), days) == add_working_days(moment, days)


def test_half_past_midnight_in_summer_is_that_london_day() -> None:
    # 00:30 BST on Tuesday 30 June 2026 is 23:30 UTC on Monday 29 June: due Wednesday, not Tuesday.
    moment = datetime(2026, 6, 29, 23, 30, tzinfo=UTC)
    assert london_date(moment) == date(2026, 6, 30)
    assert add_working_days(moment, 1) == date(2026, 7, 1)
    # In winter London is UTC: 23:30 UTC on a Friday is still Friday, due Monday.
    assert add_working_days(datetime(2026, 1, 30, 23, 30, tzinfo=UTC), 1) == date(2026, 2, 2)


def test_a_naive_instant_is_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        add_working_days(datetime(2026, 6, 29, 23, 30), 1)


def test_every_service_counts_its_due_dates_on_the_london_calendar() -> None:
    """The referral decision (1 working day, WT23) and the conferences' dates, for an instant just
    after London midnight in summer (still the day before in UTC)."""
    from csx.conferences.v1 import conferences_pb2 as cpb
    from csx_conferences import domain as conferences
    from csx_referrals import domain as referrals

    moment = datetime(2026, 6, 29, 23, 30, tzinfo=UTC)  # Tuesday 30 June, 00:30 BST
    assert referrals.decision_due_on(moment) == date(2026, 7, 1)
    routed_on = london_date(moment)
    assert conferences.family_summary_due_on(cpb.CONFERENCE_KIND_CONTEXTUAL_REVIEW, routed_on) == date(2026, 7, 2)
