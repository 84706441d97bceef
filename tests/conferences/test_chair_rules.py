"""The chair rules and the quorum, as a table: `domain.chair_refusal` (registered, trained on or
before the meeting's day, independent of the case's managing team, the lead chair of B and C
meetings inside a lead period; checked in that order) and `domain.quorate` (social care and at
least N other distinct agencies with direct contact attend)."""

from __future__ import annotations

from datetime import date

import pytest

from csx.conferences.v1 import conferences_pb2 as pb
from csx.types.v1 import types_pb2
from csx_conferences.domain import ChairRecord, chair_refusal, quorate

A, B, C = (
    pb.CONFERENCE_KIND_INITIAL_CHILD_PROTECTION,
    pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW,
    pb.CONFERENCE_KIND_CONTEXT,
)
TEAM = "team.north"
DAY = date(2026, 4, 15)  # inside the lead period below
LEAD_FROM, LEAD_UNTIL = date(2026, 4, 1), date(2026, 4, 30)


def chair(
    user_id: str = "chair.ind",
    *,
    trained_on: date | None = date(2025, 1, 10),
    manages: tuple[str, ...] = (),
    lead: tuple[date, date] | None = None,
) -> ChairRecord:
    return ChairRecord(
        user_id=user_id,
        trained_on=trained_on,
        manages_teams=frozenset(manages),
        lead_from=lead[0] if lead else None,
        lead_until=lead[1] if lead else None,
    )


INDEPENDENT = chair()
LEAD = chair("chair.lead", lead=(LEAD_FROM, LEAD_UNTIL))
# A second lead chair whose period overlaps the first one's last days.
LEAD_2 = chair("chair.lead2", lead=(date(2026, 4, 20), date(2026, 5, 10)))
UNTRAINED = chair("chair.untrained", trained_on=None)
MANAGER = chair("chair.manager", manages=("team.south", TEAM))
NO_LEADS: list[ChairRecord] = [INDEPENDENT, UNTRAINED, MANAGER]
WITH_LEAD: list[ChairRecord] = [*NO_LEADS, LEAD]
WITH_TWO_LEADS: list[ChairRecord] = [*WITH_LEAD, LEAD_2]

CASES = [
    # --- registered
    ("not in the register", None, B, DAY, NO_LEADS, "CHAIR_NOT_REGISTERED"),
    ("not in the register, even inside a lead period", None, B, DAY, WITH_LEAD, "CHAIR_NOT_REGISTERED"),
    ("not in the register, kind A", None, A, DAY, NO_LEADS, "CHAIR_NOT_REGISTERED"),
    # --- trained (on or before the meeting's day)
    ("never trained", UNTRAINED, A, DAY, NO_LEADS, "CHAIR_NOT_TRAINED"),
    ("trained on the meeting's day", chair(trained_on=DAY), A, DAY, NO_LEADS, None),
    ("trained the day before", chair(trained_on=date(2026, 4, 14)), A, DAY, NO_LEADS, None),
    ("trained the day after", chair(trained_on=date(2026, 4, 16)), A, DAY, NO_LEADS, "CHAIR_NOT_TRAINED"),
    ("trained a year later", chair(trained_on=date(2027, 4, 15)), B, DAY, NO_LEADS, "CHAIR_NOT_TRAINED"),
    # --- independent of the case's managing team
    ("manages the managing team", MANAGER, A, DAY, NO_LEADS, "CHAIR_NOT_INDEPENDENT"),
    ("manages the managing team, B", MANAGER, B, DAY, NO_LEADS, "CHAIR_NOT_INDEPENDENT"),
    ("manages other teams only", chair(manages=("team.east", "team.west")), A, DAY, NO_LEADS, None),
    # --- the order of the checks
    ("untrained and not independent: training first",
     chair(trained_on=None, manages=(TEAM,)), A, DAY, NO_LEADS, "CHAIR_NOT_TRAINED"),
    ("trained too late and not independent: training first",
     chair(trained_on=date(2026, 5, 1), manages=(TEAM,)), A, DAY, NO_LEADS, "CHAIR_NOT_TRAINED"),
    ("untrained inside a lead period: training first", UNTRAINED, B, DAY, WITH_LEAD, "CHAIR_NOT_TRAINED"),
    ("not independent inside a lead period: independence first", MANAGER, B, DAY, WITH_LEAD, "CHAIR_NOT_INDEPENDENT"),
    ("the lead chair untrained on the day",
     chair("chair.lead", trained_on=date(2026, 4, 16), lead=(LEAD_FROM, LEAD_UNTIL)),
     B, DAY, [INDEPENDENT, chair("chair.lead", trained_on=date(2026, 4, 16), lead=(LEAD_FROM, LEAD_UNTIL))],
     "CHAIR_NOT_TRAINED"),
    ("the lead chair managing the team",
     chair("chair.lead", manages=(TEAM,), lead=(LEAD_FROM, LEAD_UNTIL)),
     B, DAY, [INDEPENDENT, chair("chair.lead", manages=(TEAM,), lead=(LEAD_FROM, LEAD_UNTIL))],
     "CHAIR_NOT_INDEPENDENT"),
    # --- the lead chair of B and C meetings inside a lead period
    ("B inside the period, another chair", INDEPENDENT, B, DAY, WITH_LEAD, "LEAD_CHAIR_REQUIRED"),
    ("C inside the period, another chair", INDEPENDENT, C, DAY, WITH_LEAD, "LEAD_CHAIR_REQUIRED"),
    ("A inside the period, another chair: A has no lead chair rule", INDEPENDENT, A, DAY, WITH_LEAD, None),
    ("B inside the period, the lead chair", LEAD, B, DAY, WITH_LEAD, None),
    ("C inside the period, the lead chair", LEAD, C, DAY, WITH_LEAD, None),
    ("A inside the period, the lead chair", LEAD, A, DAY, WITH_LEAD, None),
    ("B on the period's first day, another chair", INDEPENDENT, B, LEAD_FROM, WITH_LEAD, "LEAD_CHAIR_REQUIRED"),
    ("B on the period's last day, another chair", INDEPENDENT, B, LEAD_UNTIL, WITH_LEAD, "LEAD_CHAIR_REQUIRED"),
    ("C on the period's last day, another chair", INDEPENDENT, C, LEAD_UNTIL, WITH_LEAD, "LEAD_CHAIR_REQUIRED"),
    ("B the day before the period", INDEPENDENT, B, date(2026, 3, 31), WITH_LEAD, None),
    ("B the day after the period", INDEPENDENT, B, date(2026, 5, 1), WITH_LEAD, None),
    ("C the day after the period", INDEPENDENT, C, date(2026, 5, 1), WITH_LEAD, None),
    ("B on the period's first day, the lead chair", LEAD, B, LEAD_FROM, WITH_LEAD, None),
    ("B on the period's last day, the lead chair", LEAD, B, LEAD_UNTIL, WITH_LEAD, None),
    ("B outside its own period, the lead chair", LEAD, B, date(2026, 5, 1), WITH_LEAD, None),
    ("B inside a second lead's period only: the first lead is not that lead",
     LEAD, B, date(2026, 5, 5), WITH_TWO_LEADS, "LEAD_CHAIR_REQUIRED"),
    ("B inside a second lead's period only: the second lead", LEAD_2, B, date(2026, 5, 5), WITH_TWO_LEADS, None),
    ("B where two periods overlap: either lead", LEAD, B, date(2026, 4, 25), WITH_TWO_LEADS, None),
    ("B where two periods overlap: the other lead", LEAD_2, B, date(2026, 4, 25), WITH_TWO_LEADS, None),
    ("B where two periods overlap: a chair who is neither",
     INDEPENDENT, B, date(2026, 4, 25), WITH_TWO_LEADS, "LEAD_CHAIR_REQUIRED"),
    ("B inside the first period only: the second lead (outside its own period) is not that lead",
     LEAD_2, B, date(2026, 4, 10), WITH_TWO_LEADS, "LEAD_CHAIR_REQUIRED"),
    ("B with no lead chair in the register", INDEPENDENT, B, DAY, NO_LEADS, None),
    ("C with no lead chair in the register", INDEPENDENT, C, DAY, NO_LEADS, None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("chair_record", "kind", "meeting_day", "register", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_chair_refusal(
    chair_record: ChairRecord | None,
    kind: int,
    meeting_day: date,
    register: list[ChairRecord],
    expected: str | None,
) -> None:
    assert (
        chair_refusal(chair_record, kind=kind, managing_team=TEAM, meeting_day=meeting_day, register=register)
        == expected
    )


def test_chair_record_is_frozen() -> None:
    record = chair()
    with pytest.raises(AttributeError):
        record.user_id = "someone.else"  # type: ignore[misc]


SC, POLICE, HEALTH, EDUCATION, HOUSING = (
    types_pb2.AGENCY_SOCIAL_CARE,
    types_pb2.AGENCY_POLICE,
    types_pb2.AGENCY_HEALTH,
    types_pb2.AGENCY_EDUCATION,
    types_pb2.AGENCY_HOUSING,
)


def came(*agencies: int | tuple[int, bool]) -> list[pb.Attendance]:
    """Attendance: an agency with direct contact, or (agency, direct_contact)."""
    out = []
    for a in agencies:
        agency, direct = a if isinstance(a, tuple) else (a, True)
        out.append(pb.Attendance(agency=agency, direct_contact=direct))
    return out


QUORUM = [
    ("social care and exactly two others", came(SC, POLICE, EDUCATION), 2, True),
    ("social care and three others", came(SC, POLICE, EDUCATION, HEALTH), 2, True),
    ("the order does not matter", came(POLICE, SC, EDUCATION), 2, True),
    ("social care and one other", came(SC, POLICE), 2, False),
    ("social care alone", came(SC), 2, False),
    ("social care absent, three others", came(POLICE, EDUCATION, HEALTH), 2, False),
    ("social care absent, four others, quorum of 1", came(POLICE, EDUCATION, HEALTH, HOUSING), 1, False),
    ("a second agency without direct contact does not count",
     came(SC, POLICE, (EDUCATION, False)), 2, False),
    ("others without direct contact do not count, however many",
     came(SC, (POLICE, False), (EDUCATION, False), (HEALTH, False)), 2, False),
    ("two with direct contact and one without", came(SC, POLICE, (HEALTH, False), EDUCATION), 2, True),
    ("the same agency twice counts once", came(SC, POLICE, POLICE), 2, False),
    ("the same agency twice, once without direct contact, counts once",
     came(SC, POLICE, (POLICE, False)), 2, False),
    ("social care is not one of the others", came(SC, SC, POLICE), 2, False),
    ("social care is not one of the others, quorum of 1", came(SC, SC), 1, False),
    # The brief: social care attends; direct contact qualifies the OTHER agencies.
    ("social care without the direct contact flag still attends", came((SC, False), POLICE, EDUCATION), 2, True),
    ("a quorum of 3: two others are not enough", came(SC, POLICE, EDUCATION), 3, False),
    ("a quorum of 3: exactly three others", came(SC, POLICE, EDUCATION, HEALTH), 3, True),
    ("a quorum of 1: one other", came(SC, POLICE), 1, True),
    ("a quorum of 1: one other without direct contact", came(SC, (POLICE, False)), 1, False),
    ("a quorum of 0: social care alone", came(SC), 0, True),
    ("a quorum of 0: social care absent", came(POLICE), 0, False),
    ("nobody", [], 2, False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("attendance", "others", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in QUORUM],
)
def test_quorate(attendance: list[pb.Attendance], others: int, expected: bool) -> None:
    assert quorate(attendance, others) is expected
