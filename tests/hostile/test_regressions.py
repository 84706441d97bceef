"""The bugs the hostile-input properties found, each pinned by a plain example so it stays fixed
even on a run whose random examples miss it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import jwt
import pytest
from google.protobuf import timestamp_pb2
from sqlalchemy import MetaData

from csx.conferences.v1 import conferences_pb2 as cpb
from csx.conferences.v1 import conferences_pb2_grpc
from csx.conferences.v1 import events_pb2 as conference_events
from csx.panel.v1 import events_pb2 as panel_events
from csx.referrals.v1 import events_pb2 as referral_events
from csx.referrals.v1 import referrals_pb2 as rpb
from csx.safeguarding.v1 import events_pb2 as safeguarding_events
from csx.types.v1 import types_pb2 as t
from csx_cli import conference_flow
from csx_common.db import Database
from csx_common.errors import InvalidArgument
from csx_common.identity import IdentityError, Principal, TokenIssuer, TokenVerifier
from csx_common.messaging.consumer import ConsumerSpec, InboxConsumer, Route
from csx_common.messaging.tables import DeliveryTables
from csx_common.unit_of_work import UnitsOfWork
from csx_common.validation import check_event, validate, violations
from tests.hostile.conftest import Running, Starter
from tests.hostile.support import CLEAN, call, changed, consumer_for, deliver, row_counts
from tests.support import concern_request, dev_pki, user

CHILD = str(uuid.uuid4())


# Requests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dob", ["2010-02-29", "2023-02-31", "0000-01-01"])
def test_a_date_that_does_not_exist_is_a_violation_not_a_crash(dob: str) -> None:
    """protovalidate raised EvaluationError for `timestamp()` of an impossible date: INTERNAL."""
    request = concern_request("hostile-dob-01")
    request.child.date_of_birth = dob
    with pytest.raises(InvalidArgument) as err:
        validate(request)
    assert [v.field for v in err.value.violations] == ["child.date_of_birth"]
    assert dob not in str(err.value.violations)


@pytest.mark.parametrize("seconds", [2**62, -(2**62), 253_402_300_800, -62_135_596_801])
def test_a_timestamp_outside_0001_to_9999_is_a_violation(seconds: int) -> None:
    """Out of range, ToDatetime raised in the handler: INTERNAL."""
    request = rpb.RecordSharingDecisionRequest(expires_at=timestamp_pb2.Timestamp(seconds=seconds))
    assert "expires_at" in [v.field for v in violations(request)]


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": "user\x00id"},
        {"sub": "u" * 65},
        {"sub": ""},
        {"agency": 7},
        {"role": ["chair"]},
        {"purpose": "x\n"},
    ],
)
def test_a_signed_token_with_claims_no_column_can_hold_is_refused(claims: dict[str, object]) -> None:
    """A user id with a NUL or longer than the user-id columns failed in the audit chain (INTERNAL)
    or on PostgreSQL's column width; now the token is refused (UNAUTHENTICATED)."""
    pki = dev_pki()
    token = TokenIssuer(pki.token_key_file.read_bytes()).issue(Principal("sw.one", "social_care", "chair", "x"))
    payload = jwt.decode(token, options={"verify_signature": False})
    payload.update(claims)
    forged = jwt.encode(payload, pki.token_key_file.read_bytes(), algorithm="EdDSA")
    with pytest.raises(IdentityError):
        TokenVerifier(pki.token_public_file.read_bytes()).verify(forged)


def test_an_ordinary_token_still_verifies() -> None:
    pki = dev_pki()
    principal = Principal("'; DROP TABLE audit_log;--", "social_care", "chair", "conference_participation")
    token = TokenIssuer(pki.token_key_file.read_bytes()).issue(principal)
    assert TokenVerifier(pki.token_public_file.read_bytes()).verify(token) == principal


@pytest.fixture(scope="module")
async def conferences(starter: Starter) -> AsyncIterator[Running]:
    yield await starter.conferences()


@pytest.mark.parametrize(
    "payload", [b"\xff\xff", b"\x0a\x05ab", b"\x0a\x02\xff\xfe", b"\x0b" * 5000], ids=["tag", "short", "utf8", "deep"]
)
async def test_undecodable_request_bytes_are_invalid_argument(conferences: Running, payload: bytes) -> None:
    """grpc answered UNKNOWN with the parser's exception text."""
    path = "/csx.conferences.v1.ConferencesService/GetConference"
    answer = await call(conferences.channel(user("social_care", "chair", "conference_participation")), path, payload)
    assert answer.code == grpc.StatusCode.INVALID_ARGUMENT
    assert answer.message == "request could not be decoded"


async def test_conclude_with_an_unknown_purpose_writes_nothing(conferences: Running) -> None:
    """The conclusion committed, then the read-back through the policy refused the token's purpose:
    PERMISSION_DENIED for a write that had happened (rows and a ConferenceConcluded event)."""
    routed = referral_events.ReferralRouted(
        referral_id=str(uuid.uuid4()),
        child_id=CHILD,
        intervention=t.INTERVENTION_B,
        routed_at=timestamp_pb2.Timestamp(seconds=1_790_000_000),
    )
    subject = "csx.referrals.referral_routed"
    assert await deliver(consumer_for(conferences.runtime, subject), subject, routed.SerializeToString()) == ("ack", 1)
    chair = user("social_care", "chair", "conference_participation", "chair.hostile")
    manager = user("social_care", "mash_manager", "conference_participation", "manager.hostile")
    stub = conferences_pb2_grpc.ConferencesServiceStub(conferences.channel(chair))
    (conference,) = (await stub.ListConferences(cpb.ListConferencesRequest(child_id=CHILD))).conferences
    managing = conferences_pb2_grpc.ConferencesServiceStub(conferences.channel(manager))
    await conference_flow.register_chair(managing, chair.user_id)
    held = await conference_flow.hold(managing, stub, conference, key="hostile-odd-purpose", chair_id=chair.user_id)
    request = cpb.ConcludeConferenceRequest(
        conference_id=conference.conference_id,
        idempotency_key="hostile-odd-purpose",
        expected_version=held.version,
        outcome=cpb.CONFERENCE_OUTCOME_NO_PLAN,
        summary="Held; no plan needed.",
    )
    before = await row_counts(conferences.runtime)
    odd = user("social_care", "chair", "no_such_purpose", "chair.odd")
    answer = await call(conferences.channel(odd), "/csx.conferences.v1.ConferencesService/ConcludeConference", request)
    assert answer.code == grpc.StatusCode.PERMISSION_DENIED
    assert not changed(before, await row_counts(conferences.runtime), ignore=["audit_log", "audit_head"])
    assert (await stub.ConcludeConference(request)).conference.status == cpb.CONFERENCE_STATUS_CONCLUDED
    assert answer.code in CLEAN


# Events ----------------------------------------------------------------------------------------

GOOD_CONSENT = safeguarding_events.ConsentChanged(child_id=CHILD, status=1, agencies=[1], data_classes=[10], version=1)
GOOD_SHARING = safeguarding_events.SharingDecisionRecorded(
    decision_id=str(uuid.uuid4()),
    child_id=CHILD,
    share=True,
    lawful_basis=1,
    approver="manager.one",
    agencies=[1],
    data_classes=[10],
    expires_at=timestamp_pb2.Timestamp(seconds=1_900_000_000),
)


def _with(event, **changes):  # type: ignore[no-untyped-def]
    out = type(event)()
    out.CopyFrom(event)
    for name, value in changes.items():
        if isinstance(value, list):
            del getattr(out, name)[:]
            getattr(out, name).extend(value)
        elif value is None:
            out.ClearField(name)
        else:
            setattr(out, name, value)
    return out


@pytest.mark.parametrize(
    "event",
    [
        # Stored in the disclosure view, these failed every later read of the child (KeyError or
        # ValueError in the policy model): INTERNAL on GetChildLinks, ListConferences, ...
        _with(GOOD_CONSENT, status=0),
        _with(GOOD_CONSENT, status=999),
        _with(GOOD_CONSENT, agencies=[0]),
        _with(GOOD_CONSENT, data_classes=[77]),
        _with(GOOD_CONSENT, child_id="'; DROP TABLE consent_view;--"),
        _with(GOOD_SHARING, lawful_basis=0),
        _with(GOOD_SHARING, expires_at=None),
        _with(GOOD_SHARING, share=False),
        _with(GOOD_SHARING, agencies=[1, 0]),
        _with(GOOD_SHARING, approver="a" * 65),
        # Applied, these left rows about no child (a conference, a tombstone, panel links) or
        # were retried ten times against a dependency that could never accept them.
        referral_events.ReferralRouted(child_id=CHILD, intervention=2),
        referral_events.ReferralRouted(referral_id="{" + CHILD + "}", child_id=CHILD, intervention=2),
        safeguarding_events.ChildErased(erasure_id=CHILD, child_id="", erased_at={"seconds": 1}),
        safeguarding_events.ChildErased(erasure_id=CHILD, child_id=CHILD, requested_by="x\x00"),
        conference_events.ConferenceConcluded(conference_id="not-a-uuid", child_id=CHILD),
        conference_events.ConferenceConcluded(conference_id=CHILD, child_id=CHILD, kind=9),
        referral_events.ConcernRecorded(
            concern_id=CHILD,
            referral_id=CHILD,
            child_id=CHILD + "\n",
            agency=1,
            recorded_at=timestamp_pb2.Timestamp(seconds=1),
        ),
        referral_events.ConcernRecorded(
            concern_id=CHILD,
            referral_id=CHILD,
            child_id=CHILD,
            agency=1,
            harm_types=[2] * 101,
            recorded_at=timestamp_pb2.Timestamp(seconds=1),
        ),
    ],
)
def test_malformed_events_break_their_contract(event) -> None:  # type: ignore[no-untyped-def]
    """Each is parked by the one check every route runs (csx_common.validation.check_event), from
    the rules its contract declares, naming fields, never values."""
    with pytest.raises(InvalidArgument) as err:
        check_event(event)
    assert err.value.violations
    assert all("DROP TABLE" not in v.description and "\x00" not in v.description for v in err.value.violations)


def test_well_formed_events_pass_their_contract() -> None:
    check_event(GOOD_CONSENT)
    check_event(GOOD_SHARING)
    check_event(_with(GOOD_SHARING, share=False, lawful_basis=0, expires_at=None))
    # The outcome is only a hint: conferences has the last word.
    check_event(conference_events.ConferenceConcluded(conference_id=CHILD, child_id=CHILD))


async def test_a_route_check_runs_before_the_erased_child_lookup(tmp_path: Path) -> None:
    """A NUL in a child id made the erased-child lookup fail on PostgreSQL before the handler could
    refuse the event, so it was retried ten times instead of parked."""
    metadata = MetaData()
    delivery = DeliveryTables(metadata)
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/check.db")
    await db.run_sync(metadata.create_all)
    looked_up: list[str] = []

    async def obsolete(session, event, *, lock: bool) -> bool:  # type: ignore[no-untyped-def]
        looked_up.append(event.place_id)
        raise RuntimeError("the database refused the value")

    def check(event) -> None:  # type: ignore[no-untyped-def]
        if "\x00" in event.place_id:
            raise InvalidArgument([], "event is malformed")

    async def handler(uow, event) -> None:  # type: ignore[no-untyped-def]
        raise AssertionError("never applied")

    subject = "csx.panel.place_flagged"
    spec = ConsumerSpec("hostile-check", "CSX_PANEL", [Route(subject, panel_events.PlaceFlagged, handler, check=check)])
    consumer = InboxConsumer(UnitsOfWork(db), delivery, None, spec, obsolete=obsolete)  # type: ignore[arg-type]
    bad = panel_events.PlaceFlagged(place_id="plc-park\x00").SerializeToString()
    assert await deliver(consumer, subject, bad) == ("term", 1)
    assert looked_up == []
    await db.dispose()
