"""Inputs and output of the disclosure policy decision point (docs/security.md).

Everything here is a frozen, typed value. The decision point never looks anything up: the caller
(a service's read path) gathers the originating user, the child's consent and sharing decisions,
the intelligence handling code and the requesting agency's involvement, and asks one question per
field class. Nothing here holds a personal *value*: only ids, codes, enums and timestamps.

Vocabulary:

- agencies are `csx.types.v1.Agency` values, data classes are `csx.options.v1.DataClass` values
  (the same enums the protos use; in the policy YAML they are written lower-case without the prefix:
  `police`, `police_intelligence`);
- roles, purposes, consent states, lawful bases, handling codes, field subjects and involvement
  bases are the string enums below; their values are the words used in the policy YAML.

Whose data a field is (`FieldSubject`) is also the caller's to say, per path: the child's, a
referrer's, or part of the requester's agency's own record (`OWN_RECORD`, see that class for
exactly when a read path may mark a field so).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from csx.options.v1 import options_pb2
from csx.types.v1 import types_pb2

Agency = types_pb2.Agency
DataClass = options_pb2.DataClass

#: Lower-case policy names of every defined agency / data class (the `_UNSPECIFIED` zero excluded).
AGENCY_BY_NAME: dict[str, int] = {
    v.name.removeprefix("AGENCY_").lower(): v.number for v in types_pb2.Agency.DESCRIPTOR.values if v.number != 0
}
DATA_CLASS_BY_NAME: dict[str, int] = {
    v.name.removeprefix("DATA_CLASS_").lower(): v.number
    for v in options_pb2.DataClass.DESCRIPTOR.values
    if v.number != 0
}
AGENCY_NAME: dict[int, str] = {number: name for name, number in AGENCY_BY_NAME.items()}
DATA_CLASS_NAME: dict[int, str] = {number: name for name, number in DATA_CLASS_BY_NAME.items()}

#: Break-glass is time-boxed to one hour (docs/process.md, rules; docs/security.md).
MAX_BREAK_GLASS = timedelta(hours=1)


class Role(StrEnum):
    """The originating user's role (carried in their signed token)."""

    SOCIAL_WORKER = "social_worker"
    MASH_MANAGER = "mash_manager"
    #: Lead child protection conference chair (social care, independent of line management).
    CHAIR = "chair"
    POLICE_ANALYST = "police_analyst"
    POLICE_OFFICER = "police_officer"
    #: A school's designated safeguarding lead.
    DSL = "dsl"
    HEALTH_SAFEGUARDING_NURSE = "health_safeguarding_nurse"
    YOUTH_JUSTICE_WORKER = "youth_justice_worker"
    #: Any other partner's practitioner (community safety, transport, licensing, housing, voluntary).
    PRACTITIONER = "practitioner"
    #: A member of the MARVE panel acting as such (places and peer groups, not individual cases).
    PANEL_MEMBER = "panel_member"
    #: The partnership's quality-assurance team (pilot reviews).
    AUDITOR = "auditor"
    #: Social care's data protection officer: requests and approves erasures (never reads by it).
    DATA_PROTECTION_OFFICER = "data_protection_officer"


class Purpose(StrEnum):
    """Why the user is reading (carried in their token; each read is audited with it)."""

    REFERRAL_SCREENING = "referral_screening"
    CONFERENCE_PARTICIPATION = "conference_participation"
    ACTION_DELIVERY = "action_delivery"
    PANEL_ANALYSIS = "panel_analysis"
    QUALITY_ASSURANCE = "quality_assurance"
    BREAK_GLASS = "break_glass"
    #: Erasure and retention (records management); no policy rule permits reading for it.
    RECORDS_MANAGEMENT = "records_management"


class ConsentStatus(StrEnum):
    GIVEN = "given"
    REFUSED = "refused"
    WITHDRAWN = "withdrawn"
    NOT_SOUGHT = "not_sought"


class LawfulBasis(StrEnum):
    """The lawful basis recorded on a decision to share."""

    #: DPA 2018 Sch. 1 para 18, safeguarding of children and individuals at risk: sharing without
    #: consent where consent cannot be given, cannot reasonably be obtained, or seeking it would
    #: prejudice the child's protection.
    SCH1_PARA18 = "sch1_para18"
    #: UK GDPR art. 6(1)(e) with the Children Act 1989 s.17/s.47 and Children Act 2004 s.11 duties.
    PUBLIC_TASK = "public_task"
    #: UK GDPR art. 6(1)(c), e.g. a court order.
    LEGAL_OBLIGATION = "legal_obligation"
    #: UK GDPR art. 6(1)(d), to protect someone's life.
    VITAL_INTERESTS = "vital_interests"


class HandlingCode(StrEnum):
    """3x5x2 handling (College of Policing APP, intelligence management)."""

    #: Lawful sharing permitted.
    P = "p"
    #: Share only under the stated conditions, which travel with the data.
    C = "c"


#: The policy's word for "no handling code given" (ungraded intelligence).
HANDLING_NONE = "none"


class FieldSubject(StrEnum):
    """Whose data the field is, for this requester: the child's (default), the referring
    professional's, or part of the requester's agency's own record.

    `OWN_RECORD` is decided per field path, per read, by the caller (the service's read path),
    never by the policy and never from anything the user asserts: mark a field `OWN_RECORD` only
    when the part of the record it belongs to was created or is owned by the *requester's agency*
    according to the service's own data, i.e. `requester.agency` equals

    - the agency that raised the concern, for that concern's fields (its narrative, harm types,
      contexts, and its `referrer` block: the referrer is that agency's own staff);
    - the owning agency of the action, for that action's fields (description, due date, status).

    Every other field keeps its ordinary subject: a plain data class in `decide_fields` (the
    subject then follows from the path: `referrer` segments are `REFERRER`, the rest `CHILD`),
    or `FieldSpec(data_class)` / `FieldSpec(data_class, FieldSubject.REFERRER)`. Other agencies'
    concerns and actions, and the child's identity, are never `OWN_RECORD`, even when the
    requester's agency also wrote something else in the record. For example, a health nurse
    reading a plan whose action 0 is owned by health and action 1 by police::

        engine.decide_fields(ctx, {
            "actions[0].description": FieldSpec(DataClass.DATA_CLASS_NARRATIVE, FieldSubject.OWN_RECORD),
            "actions[1].description": DataClass.DATA_CLASS_NARRATIVE,  # the child's; needs a basis
        })

    The policy (`permit-own-record` and the `unless` entries naming `own_record`) lets an agency's
    practitioners, reading for casework, see their own record whatever the consent, a decision not
    to share or the involvement view say: the agency's own words are not disclosed to it. Purpose
    limits (quality assurance, panel analysis: operational only), break-glass rules and the
    handling conditions of police intelligence still apply."""

    CHILD = "child"
    #: `Referrer` fields: never disclosed outside the referring agency and social care.
    REFERRER = "referrer"
    #: A field of a part of the record (a concern, an action) the requester's agency created or owns.
    OWN_RECORD = "own_record"


class Involvement(StrEnum):
    """The requesting agency's basis for knowing about this child at all: each is a decision that
    someone else recorded (policy.yaml, `involvement`). Submitting a concern is not one: an agency's
    own submissions never open another agency's records to it."""

    #: Social care routed a referral holding a concern the agency raised (the MASH's decision).
    REFERRED = "referred"
    #: The agency owns an action in the child's plan.
    ACTION_OWNER = "action_owner"
    #: The agency is invited to (or attends) a conference about the child.
    CONFERENCE_ATTENDEE = "conference_attendee"
    #: An active recorded decision to share names the agency (the decision itself is in the context).
    SHARING_DECISION = "sharing_decision"


def _check_aware(name: str, value: datetime | None) -> None:
    if value is not None and value.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware")


def _check_agency(agency: int) -> None:
    if agency not in AGENCY_NAME:
        raise ValueError(f"unknown or unspecified agency {agency!r}")


def _check_data_class(data_class: int) -> None:
    if data_class not in DATA_CLASS_NAME:
        raise ValueError(f"unknown or unspecified data class {data_class!r}")


def _check_scope(name: str, values: frozenset[int] | None, known: dict[int, str]) -> None:
    if values is None:
        return
    if not isinstance(values, frozenset):
        raise TypeError(f"{name} must be a frozenset or None")
    unknown = [v for v in values if v not in known]
    if unknown:
        raise ValueError(f"{name}: unknown values {sorted(unknown)}")


@dataclass(frozen=True, slots=True)
class Requester:
    """The *originating* user (from their verified token), never the calling service."""

    user_id: str
    agency: int
    role: Role
    purpose: Purpose

    def __post_init__(self) -> None:
        if not self.user_id:
            raise ValueError("user_id is required")
        _check_agency(self.agency)
        object.__setattr__(self, "role", Role(self.role))
        object.__setattr__(self, "purpose", Purpose(self.purpose))


@dataclass(frozen=True, slots=True)
class Consent:
    """The child's consent state. The status applies to the agencies and data classes in scope;
    `None` means every agency / every data class. Outside its scope a status counts as not sought
    (so consent given to health only is no consent for police, and a withdrawal for police only
    does not touch health)."""

    status: ConsentStatus = ConsentStatus.NOT_SOUGHT
    agencies: frozenset[int] | None = None
    data_classes: frozenset[int] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", ConsentStatus(self.status))
        _check_scope("consent agencies", self.agencies, AGENCY_NAME)
        _check_scope("consent data_classes", self.data_classes, DATA_CLASS_NAME)

    def effective(self, agency: int, data_class: int) -> ConsentStatus:
        if (self.agencies is None or agency in self.agencies) and (
            self.data_classes is None or data_class in self.data_classes
        ):
            return self.status
        return ConsentStatus.NOT_SOUGHT


@dataclass(frozen=True, slots=True)
class SharingDecision:
    """A recorded decision to share (with a lawful basis) or *not* to share (which forbids).

    Scope: the agencies and data classes it covers (`None`: all). Expiry: a decision to share must
    have one; a decision not to share may run until revoked (`expires_at=None`)."""

    decision_id: str
    share: bool
    reason: str
    approver: str
    agencies: frozenset[int] | None = None
    data_classes: frozenset[int] | None = None
    lawful_basis: LawfulBasis | None = None
    expires_at: datetime | None = None

    def __post_init__(self) -> None:
        if not self.decision_id or not self.reason.strip() or not self.approver:
            raise ValueError("a sharing decision needs an id, a reason and an approver")
        _check_scope("sharing decision agencies", self.agencies, AGENCY_NAME)
        _check_scope("sharing decision data_classes", self.data_classes, DATA_CLASS_NAME)
        _check_aware("expires_at", self.expires_at)
        if self.share:
            if self.lawful_basis is None or self.expires_at is None:
                raise ValueError("a decision to share needs a lawful basis and an expiry")
            object.__setattr__(self, "lawful_basis", LawfulBasis(self.lawful_basis))
        elif self.lawful_basis is not None:
            raise ValueError("a decision not to share has no lawful basis")

    def active(self, now: datetime) -> bool:
        return self.expires_at is None or now < self.expires_at

    def covers(self, agency: int, data_class: int) -> bool:
        return (self.agencies is None or agency in self.agencies) and (
            self.data_classes is None or data_class in self.data_classes
        )


@dataclass(frozen=True, slots=True)
class IntelligenceHandling:
    """The handling code of the record's police intelligence (APP 3x5x2). For C, `agencies` are
    the agencies its conditions name (empty: the policy's default, police and social care)."""

    code: HandlingCode
    conditions: str = ""
    agencies: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "code", HandlingCode(self.code))
        _check_scope("handling agencies", self.agencies, AGENCY_NAME)
        if self.code is HandlingCode.C and not self.conditions.strip():
            raise ValueError("handling code C requires its conditions")


@dataclass(frozen=True, slots=True)
class BreakGlassGrant:
    """An emergency grant to one user: reason required, at most one hour, reviewed within 72 hours."""

    grant_id: str
    user_id: str
    reason: str
    granted_at: datetime
    expires_at: datetime

    def __post_init__(self) -> None:
        if not self.grant_id or not self.user_id or not self.reason.strip():
            raise ValueError("a break-glass grant needs an id, a user and a reason")
        _check_aware("granted_at", self.granted_at)
        _check_aware("expires_at", self.expires_at)
        if not timedelta(0) < self.expires_at - self.granted_at <= MAX_BREAK_GLASS:
            raise ValueError("a break-glass grant lasts more than zero and at most one hour")

    def active_for(self, user_id: str, now: datetime) -> bool:
        return self.user_id == user_id and self.granted_at <= now < self.expires_at


@dataclass(frozen=True, slots=True)
class DisclosureContext:
    """Everything about one read except the field: who asks, about which child's record, and the
    child's consent, sharing decisions, intelligence handling and the agency's involvement.

    `at` is the time the decision is made for (expiries); `None` means now (UTC)."""

    requester: Requester
    consent: Consent = Consent()
    sharing_decisions: tuple[SharingDecision, ...] = ()
    handling: IntelligenceHandling | None = None
    involvement: frozenset[Involvement] = frozenset()
    #: The requester's agency is the agency that made this referral. One flag per read: it applies
    #: to every `referrer` path. For a record holding several concerns, leave it False and mark the
    #: requester's own concern (its referrer block included) `FieldSubject.OWN_RECORD` instead, so
    #: that other agencies' referrers stay protected.
    referring_agency: bool = False
    break_glass: BreakGlassGrant | None = None
    at: datetime | None = None

    def __post_init__(self) -> None:
        _check_aware("at", self.at)
        if not isinstance(self.sharing_decisions, tuple):
            object.__setattr__(self, "sharing_decisions", tuple(self.sharing_decisions))
        object.__setattr__(self, "involvement", frozenset(Involvement(i) for i in self.involvement))

    def field(self, data_class: int, subject: FieldSubject = FieldSubject.CHILD) -> PolicyRequest:
        return PolicyRequest(self, data_class, subject)


@dataclass(frozen=True, slots=True)
class PolicyRequest:
    """One question: may this context see a field of this data class (about this subject)?"""

    context: DisclosureContext
    data_class: int
    field_subject: FieldSubject = FieldSubject.CHILD

    def __post_init__(self) -> None:
        _check_data_class(self.data_class)
        object.__setattr__(self, "field_subject", FieldSubject(self.field_subject))


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """A field for `decide_fields` when the path alone does not say whose data it is: a referrer
    field under an unusual path (`FieldSpec(IDENTITY, FieldSubject.REFERRER)`), or a field of the
    requester's agency's own concern or action (`FieldSpec(NARRATIVE, FieldSubject.OWN_RECORD)`;
    see `FieldSubject` for exactly when)."""

    data_class: int
    subject: FieldSubject = FieldSubject.CHILD


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer, naming the rule that decided. `reason` is the rule's description (static text,
    never personal data). `lawful_basis` / `sharing_decision_id`: the recorded sharing decision in
    play, for the audit entry: for an allow, the active decision to share covering this agency and
    data class, if any (Sch.1 para 18 first); for a deny by a forbid, the active decision NOT to
    share covering them, if any. The default deny carries neither."""

    allowed: bool
    rule: str
    reason: str
    obligations: tuple[str, ...] = field(default=())
    lawful_basis: str | None = None
    sharing_decision_id: str | None = None
