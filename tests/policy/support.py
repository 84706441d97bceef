"""Builders for policy tests: short words in, typed policy inputs out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from csx_safeguarding.policy import (
    AGENCY_BY_NAME,
    DATA_CLASS_BY_NAME,
    BreakGlassGrant,
    Consent,
    ConsentStatus,
    DisclosureContext,
    HandlingCode,
    IntelligenceHandling,
    Involvement,
    LawfulBasis,
    Requester,
    Role,
    SharingDecision,
)

NOW = datetime(2021, 2, 9, 10, 30, tzinfo=UTC)
USER = "user-1"


def agency(name: str) -> int:
    return AGENCY_BY_NAME[name]


def data_class(name: str) -> int:
    return DATA_CLASS_BY_NAME[name]


def share(
    basis: str,
    agencies: list[str] | None = None,
    classes: list[str] | None = None,
    *,
    expires: timedelta = timedelta(days=30),
    decision_id: str = "sd-1",
) -> SharingDecision:
    return SharingDecision(
        decision_id=decision_id,
        share=True,
        reason="recorded reason",
        approver="mash-manager-1",
        agencies=None if agencies is None else frozenset(agency(a) for a in agencies),
        data_classes=None if classes is None else frozenset(data_class(c) for c in classes),
        lawful_basis=LawfulBasis(basis),
        expires_at=NOW + expires,
    )


def not_to_share(
    agencies: list[str] | None = None, classes: list[str] | None = None, *, decision_id: str = "nts-1"
) -> SharingDecision:
    return SharingDecision(
        decision_id=decision_id,
        share=False,
        reason="recorded reason",
        approver="mash-manager-1",
        agencies=None if agencies is None else frozenset(agency(a) for a in agencies),
        data_classes=None if classes is None else frozenset(data_class(c) for c in classes),
    )


def handling(spec: str | None) -> IntelligenceHandling | None:
    """None, "p", "c" (conditions name no agency), or "c:health,education" (conditions name them)."""
    if spec is None:
        return None
    code, _, names = spec.partition(":")
    if code == "p":
        return IntelligenceHandling(HandlingCode.P)
    return IntelligenceHandling(
        HandlingCode.C,
        conditions="not to be disclosed to the family",
        agencies=frozenset(agency(a) for a in names.split(",") if a),
    )


def grant(state: str | None, user: str = USER) -> BreakGlassGrant | None:
    """None, "active", "expired" or "other_user"."""
    if state is None:
        return None
    start = NOW - (timedelta(minutes=90) if state == "expired" else timedelta(minutes=10))
    return BreakGlassGrant(
        grant_id="bg-1",
        user_id="someone-else" if state == "other_user" else user,
        reason="child missing overnight; location needed",
        granted_at=start,
        expires_at=start + timedelta(hours=1),
    )


def context(
    agency_name: str,
    role: str,
    purpose: str,
    *,
    consent: str = "not_sought",
    consent_agencies: list[str] | None = None,
    consent_classes: list[str] | None = None,
    decisions: tuple[SharingDecision, ...] = (),
    handling_spec: str | None = None,
    involved: bool = True,
    referring: bool = False,
    break_glass: str | None = None,
) -> DisclosureContext:
    return DisclosureContext(
        requester=Requester(USER, agency(agency_name), Role(role), purpose),  # type: ignore[arg-type]
        consent=Consent(
            ConsentStatus(consent),
            None if consent_agencies is None else frozenset(agency(a) for a in consent_agencies),
            None if consent_classes is None else frozenset(data_class(c) for c in consent_classes),
        ),
        sharing_decisions=decisions,
        handling=handling(handling_spec),
        involvement=frozenset({Involvement.ACTION_OWNER}) if involved else frozenset(),
        referring_agency=referring,
        break_glass=grant(break_glass),
        at=NOW,
    )
