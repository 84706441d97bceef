"""The whole system as `make run` starts it: nats-server plus four service processes.

A concern's journey end to end (driven by `csx demo journey`, as a user would), one trace across
all four services, no plaintext personal data in any database file or in the JetStream store, and
no event lost or doubled while the broker is down.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

from csx.panel.v1 import panel_pb2, panel_pb2_grpc
from csx.referrals.v1 import referrals_pb2_grpc
from csx.safeguarding.v1 import safeguarding_pb2
from csx_cli.stack import Stack
from tests.e2e.conftest import csx, hold
from tests.support import concern_request, eventually, files_containing, user, user_channel

REFERRER = user("education", "dsl", "referral_screening", "dsl.e2e")
ANALYST = user("police", "panel_member", "panel_analysis", "analyst.e2e")


@pytest.mark.parametrize("intervention", ["A", "B"])
def test_demo_journey_runs_through_a_review_as_one_trace(stack: Stack, intervention: str) -> None:
    trace_file = stack.data_dir / f"cli-spans-{intervention}.jsonl"
    result = csx(stack, "demo", "journey", "--intervention", intervention, "--trace-file", str(trace_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"intervention {intervention} through a review" in result.stdout
    assert "review concluded" in result.stdout and "plan published" in result.stdout
    journey_traces = {json.loads(line)["trace_id"] for line in trace_file.read_text().splitlines()}
    assert len(journey_traces) == 1
    [trace_id] = journey_traces

    def services_in_trace() -> set[str]:
        spans = [json.loads(line) for line in (stack.data_dir / "spans.jsonl").read_text().splitlines()]
        return {s["service"] for s in spans if s["trace_id"] == trace_id}

    assert services_in_trace() >= {"csx-referrals", "csx-panel", "csx-conferences", "csx-actionplans"}


def test_status_reports_healthy_stack(stack: Stack) -> None:
    result = csx(stack, "status", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report  # services, streams and consumers listed


async def test_no_plaintext_in_databases_or_jetstream_store(stack: Stack) -> None:
    canaries = {
        "given_name": "Zqxcanarygiven",
        "family_name": "Zqxcanaryfamily",
        "narrative": "ZQXCANARYNARRATIVE at the skate park",
        "referrer": "Zqxcanaryreferrer",
    }
    req = concern_request("canary-e2e-0001")
    req.child.given_name = canaries["given_name"]
    req.child.family_name = canaries["family_name"]
    req.narrative = canaries["narrative"]
    req.referrer.name = canaries["referrer"]
    async with user_channel(stack.addresses["referrals"], REFERRER, stack.pki) as ch:
        reply = await referrals_pb2_grpc.ReferralsServiceStub(ch).SubmitConcern(req, timeout=10)
    async with user_channel(stack.addresses["panel"], ANALYST, stack.pki) as ch:
        panel = panel_pb2_grpc.PanelServiceStub(ch)

        async def recorded() -> bool:
            try:
                links = await panel.GetChildLinks(panel_pb2.GetChildLinksRequest(child_id=reply.child_id), timeout=5)
            except grpc.aio.AioRpcError:
                return False
            return reply.concern_id in links.concern_ids

        await eventually(recorded)
    needles = [v.encode() for v in canaries.values()] + [v.upper().encode() for v in canaries.values()]
    assert files_containing(stack.data_dir, needles) == []


async def test_broker_outage_loses_and_doubles_nothing(stack: Stack) -> None:
    place = "plc-outage-test"
    stack.stop_nats()
    try:
        replies = []
        async with user_channel(stack.addresses["referrals"], REFERRER, stack.pki) as ch:
            stub = referrals_pb2_grpc.ReferralsServiceStub(ch)
            for i in range(20):
                req = concern_request(f"outage-{i:04d}")
                req.child.ClearField("nhs_number")
                req.child.given_name = f"Outage{i}"
                req.contexts[0].place_id = place
                replies.append(await stub.SubmitConcern(req, timeout=10))
    finally:
        stack.start_nats()
    assert len({r.concern_id for r in replies}) == 20
    async with user_channel(stack.addresses["panel"], ANALYST, stack.pki) as ch:
        panel = panel_pb2_grpc.PanelServiceStub(ch)

        async def all_arrived() -> bool:
            try:
                profile = await panel.GetPlaceProfile(panel_pb2.GetPlaceProfileRequest(place_id=place), timeout=5)
            except grpc.aio.AioRpcError:
                return False
            return profile.profile.concern_count >= 20

        await eventually(all_arrived, within=60)
        profile = await panel.GetPlaceProfile(panel_pb2.GetPlaceProfileRequest(place_id=place), timeout=5)
    assert (profile.profile.concern_count, profile.profile.child_count) == (20, 20)


async def test_consent_change_reaches_another_service_within_one_second(stack: Stack) -> None:
    """Consent is recorded in referrals; actionplans decides on its own view of it (events)."""
    import time

    from csx.actionplans.v1 import actionplans_pb2, actionplans_pb2_grpc
    from csx.conferences.v1 import conferences_pb2, conferences_pb2_grpc
    from csx.referrals.v1 import referrals_pb2

    police = user("police", "police_officer", "action_delivery", "pc.e2e")
    social = user("social_care", "social_worker", "referral_screening", "sw.e2e")
    chair = user("social_care", "chair", "conference_participation", "chair.e2e")
    request = concern_request("consent-e2e-01")
    request.agency = 1  # police
    request.child.ClearField("nhs_number")  # a child of its own: the NHS number is another test's
    request.child.given_name = "Consentchild"
    a = stack.addresses
    async with (
        user_channel(a["referrals"], police, stack.pki) as police_referrals,
        user_channel(a["referrals"], social, stack.pki) as social_referrals,
        user_channel(a["conferences"], chair, stack.pki) as chair_conferences,
        user_channel(a["actionplans"], police, stack.pki) as police_plans,
    ):
        submitted = await referrals_pb2_grpc.ReferralsServiceStub(police_referrals).SubmitConcern(request, timeout=10)
        referrals = referrals_pb2_grpc.ReferralsServiceStub(social_referrals)
        await referrals.RecordScreeningDecision(
            referrals_pb2.RecordScreeningDecisionRequest(
                referral_id=submitted.referral_id,
                idempotency_key="consent-e2e-decide",
                outcome=referrals_pb2.SCREENING_OUTCOME_INTERVENTION_B,
                reason="Extra-familial harm; family protective.",
                decided_by="sw.e2e",
            ),
            timeout=10,
        )
        conferences = conferences_pb2_grpc.ConferencesServiceStub(chair_conferences)
        listed: list[conferences_pb2.Conference] = []

        async def scheduled() -> bool:
            reply = await conferences.ListConferences(
                conferences_pb2.ListConferencesRequest(child_id=submitted.child_id), timeout=5
            )
            listed[:] = reply.conferences
            return bool(listed)

        await eventually(scheduled)
        held = await hold(stack, conferences, chair, listed[0], "consent-e2e-conclude")
        await conferences.ConcludeConference(
            conferences_pb2.ConcludeConferenceRequest(
                conference_id=listed[0].conference_id,
                idempotency_key="consent-e2e-conclude",
                expected_version=held.version,
                outcome=conferences_pb2.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN,
                summary="Plan agreed with the family and the school.",
                actions=[
                    conferences_pb2.AgreedAction(
                        owner_agency=1, description="Patrol the park on Friday evenings", due_on="2027-01-15"
                    ),
                    conferences_pb2.AgreedAction(
                        owner_agency=3, description="Mentor at lunchtimes; safe route home", due_on="2027-01-20"
                    ),
                ],
            ),
            timeout=10,
        )
        plans = actionplans_pb2_grpc.ActionPlansServiceStub(police_plans)

        async def police_reads() -> actionplans_pb2.ListActionPlansResponse:
            return await plans.ListActionPlans(
                actionplans_pb2.ListActionPlansRequest(child_id=submitted.child_id), timeout=5
            )

        async def published() -> bool:
            return bool((await police_reads()).plans)

        await eventually(published)
        first = await police_reads()
        # The police read their own action in full; the school's only with consent or a sharing basis.
        assert first.plans[0].actions[0].description == "Patrol the park on Friday evenings"
        assert list(first.redacted_fields) == ["plans[0].actions[1].description"]

        async def consent(status: int, key: str) -> float:
            await referrals.RecordConsent(
                referrals_pb2.RecordConsentRequest(
                    child_id=submitted.child_id,
                    idempotency_key=key,
                    status=status,
                    given_by=referrals_pb2.CONSENT_GIVER_YOUNG_PERSON,
                ),
                timeout=5,
            )
            return time.monotonic()

        recorded = await consent(safeguarding_pb2.CONSENT_STATUS_GIVEN, "consent-e2e-give")

        async def description_visible() -> bool:
            reply = await police_reads()
            return reply.plans[0].actions[1].description == "Mentor at lunchtimes; safe route home"

        await eventually(description_visible, within=1.0, every=0.02)
        given_latency = time.monotonic() - recorded

        recorded = await consent(safeguarding_pb2.CONSENT_STATUS_WITHDRAWN, "consent-e2e-withdraw")

        async def description_hidden() -> bool:
            return not (await police_reads()).plans[0].actions[1].description

        await eventually(description_hidden, within=1.0, every=0.02)
        withdrawn_latency = time.monotonic() - recorded
    assert given_latency < 1.0 and withdrawn_latency < 1.0


async def test_a_break_glass_grant_reaches_another_service_within_one_second(stack: Stack) -> None:
    """Granted in referrals, in force in conferences (its view, fed by the event) within a second."""
    import time

    from csx.conferences.v1 import conferences_pb2, conferences_pb2_grpc
    from csx.referrals.v1 import referrals_pb2

    police = user("police", "police_officer", "referral_screening", "pc.bg.e2e")
    social = user("social_care", "social_worker", "referral_screening", "sw.bg.e2e")
    nurse = user("health", "health_safeguarding_nurse", "conference_participation", "nurse.bg.e2e")
    emergency = user("health", "health_safeguarding_nurse", "break_glass", "nurse.bg.e2e")
    request = concern_request("bg-e2e-01")
    request.agency, request.agency_reference = 1, "POL-BG-E2E-1"
    request.child.ClearField("nhs_number")  # a child of its own: the NHS number is another test's
    request.child.given_name = "Breakglasschild"
    a = stack.addresses
    async with (
        user_channel(a["referrals"], police, stack.pki) as police_referrals,
        user_channel(a["referrals"], social, stack.pki) as social_referrals,
        user_channel(a["referrals"], nurse, stack.pki) as nurse_referrals,
        user_channel(a["conferences"], social, stack.pki) as social_conferences,
        user_channel(a["conferences"], emergency, stack.pki) as emergency_conferences,
    ):
        submitted = await referrals_pb2_grpc.ReferralsServiceStub(police_referrals).SubmitConcern(request, timeout=10)
        await referrals_pb2_grpc.ReferralsServiceStub(social_referrals).RecordScreeningDecision(
            referrals_pb2.RecordScreeningDecisionRequest(
                referral_id=submitted.referral_id,
                idempotency_key="bg-e2e-decide",
                outcome=referrals_pb2.SCREENING_OUTCOME_INTERVENTION_B,
                reason="Extra-familial harm; family protective.",
                decided_by="sw.bg.e2e",
            ),
            timeout=10,
        )
        listing = conferences_pb2.ListConferencesRequest(child_id=submitted.child_id)

        async def scheduled() -> bool:
            reply = await conferences_pb2_grpc.ConferencesServiceStub(social_conferences).ListConferences(
                listing, timeout=5
            )
            return bool(reply.conferences)

        await eventually(scheduled)
        urgent = conferences_pb2_grpc.ConferencesServiceStub(emergency_conferences)
        assert not (await urgent.ListConferences(listing, timeout=5)).conferences  # no grant, no basis
        await referrals_pb2_grpc.ReferralsServiceStub(nurse_referrals).StartBreakGlass(
            referrals_pb2.StartBreakGlassRequest(
                child_id=submitted.child_id,
                idempotency_key="bg-e2e-start",
                reason="Child in A&E unconscious; need known risks before treatment tonight.",
            ),
            timeout=5,
        )
        granted = time.monotonic()

        async def visible() -> bool:
            return bool((await urgent.ListConferences(listing, timeout=5)).conferences)

        await eventually(visible, within=1.0, every=0.02)
    assert time.monotonic() - granted < 1.0


async def test_audit_chain_verifies_and_answers_who_saw_what(stack: Stack) -> None:
    """`csx audit child` answers who saw what about a child; `csx audit verify` finds the chain intact
    and anchored by signed checkpoints (issue 3 item 6)."""
    import asyncio

    from csx.referrals.v1 import referrals_pb2

    request = concern_request("audit-e2e-01")
    request.child.ClearField("nhs_number")
    request.child.given_name = "Auditchild"
    async with user_channel(stack.addresses["referrals"], REFERRER, stack.pki) as channel:
        stub = referrals_pb2_grpc.ReferralsServiceStub(channel)
        submitted = await stub.SubmitConcern(request, timeout=10)
        await stub.GetConcern(referrals_pb2.GetConcernRequest(concern_id=submitted.concern_id), timeout=5)
    url = stack.database_url("referrals")
    await asyncio.sleep(2.5)  # at least one checkpoint signed after the read
    history = csx(stack, "audit", "child", submitted.child_id, "--database-url", url, "--json")
    assert history.returncode == 0, history.stdout + history.stderr
    entries = json.loads(history.stdout)
    rows = entries if isinstance(entries, list) else entries.get("entries", entries)
    assert any(r["actor_user_id"] == "dsl.e2e" for r in rows)
    assert "Auditchild" not in history.stdout
    public_key = f"{stack.audit_signing_key('referrals')}.pub"
    verified = csx(stack, "audit", "verify", "--database-url", url, "--public-key", public_key, "--json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    report = json.loads(verified.stdout)
    assert report["ok"] is True and report["checkpoints"] >= 1 and report["entries"] >= 1


async def test_erasure_reaches_every_service_and_copies_taken_before_it(stack: Stack, tmp_path: Path) -> None:
    """`csx child erase` (issue 4 item 3): two data protection officers erase a child; every service
    destroys the child's keys and answers NOT_FOUND; the audit says who and when in each service; a
    copy of the rows taken before the erasure cannot be decrypted with the keyring afterwards (the
    KEK that wrapped its keys is rotated away); another child is untouched. Runs last in the module:
    it rotates the stack's KEK."""
    from sqlalchemy import MetaData, select

    from csx.actionplans.v1 import actionplans_pb2, actionplans_pb2_grpc
    from csx.conferences.v1 import conferences_pb2, conferences_pb2_grpc
    from csx.referrals.v1 import referrals_pb2
    from csx_common.crypto import DataLossError
    from csx_common.datakeys import DataKeys, data_keys_table
    from csx_common.db import Database
    from csx_common.keyring import FileKeyring
    from csx_common.sealing import Sealer
    from csx_common.sensitivity import registry
    from csx_referrals import tables as referral_tables

    police = user("police", "police_officer", "action_delivery", "pc.erase")
    social = user("social_care", "social_worker", "referral_screening", "sw.erase")
    chair = user("social_care", "chair", "conference_participation", "chair.erase")
    a = stack.addresses
    erased_req, kept_req = concern_request("erase-e2e-0001"), concern_request("erase-e2e-0002")
    for req, name in ((erased_req, "Erasechild"), (kept_req, "Keepchild")):
        req.agency = 1
        req.child.ClearField("nhs_number")
        req.child.given_name = name
    async with (
        user_channel(a["referrals"], police, stack.pki) as police_referrals,
        user_channel(a["referrals"], social, stack.pki) as social_referrals,
        user_channel(a["conferences"], chair, stack.pki) as chair_conferences,
        user_channel(a["actionplans"], police, stack.pki) as police_plans,
        user_channel(a["panel"], police, stack.pki) as police_panel,
    ):
        reporter = referrals_pb2_grpc.ReferralsServiceStub(police_referrals)
        erased = await reporter.SubmitConcern(erased_req, timeout=10)
        kept = await reporter.SubmitConcern(kept_req, timeout=10)
        await referrals_pb2_grpc.ReferralsServiceStub(social_referrals).RecordScreeningDecision(
            referrals_pb2.RecordScreeningDecisionRequest(
                referral_id=erased.referral_id,
                idempotency_key="erase-e2e-decide",
                outcome=referrals_pb2.SCREENING_OUTCOME_INTERVENTION_B,
                reason="Extra-familial harm; family protective.",
                decided_by="sw.erase",
            ),
            timeout=10,
        )
        conferences = conferences_pb2_grpc.ConferencesServiceStub(chair_conferences)
        listed: list[conferences_pb2.Conference] = []

        async def scheduled() -> bool:
            reply = await conferences.ListConferences(
                conferences_pb2.ListConferencesRequest(child_id=erased.child_id), timeout=5
            )
            listed[:] = reply.conferences
            return bool(listed)

        await eventually(scheduled)
        held = await hold(stack, conferences, chair, listed[0], "erase-e2e-conclude")
        await conferences.ConcludeConference(
            conferences_pb2.ConcludeConferenceRequest(
                conference_id=listed[0].conference_id,
                idempotency_key="erase-e2e-conclude",
                expected_version=held.version,
                outcome=conferences_pb2.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN,
                summary="Plan agreed with the family.",
                actions=[conferences_pb2.AgreedAction(owner_agency=1, description="Patrol", due_on="2027-01-15")],
            ),
            timeout=10,
        )
        plans = actionplans_pb2_grpc.ActionPlansServiceStub(police_plans)
        list_plans = actionplans_pb2.ListActionPlansRequest(child_id=erased.child_id)

        async def published() -> bool:
            return bool((await plans.ListActionPlans(list_plans, timeout=5)).plans)

        await eventually(published)
        panel = panel_pb2_grpc.PanelServiceStub(police_panel)

        async def linked() -> bool:  # the panel records the concern from its event, in its own time
            try:
                await panel.GetChildLinks(panel_pb2.GetChildLinksRequest(child_id=erased.child_id), timeout=5)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                return False
            return True

        await eventually(linked)

        # The "backup": every data key row and the child's concern, as a copy of the database holds them.
        keys_table = data_keys_table(MetaData())
        backup: dict[str, list[tuple]] = {}  # type: ignore[type-arg]
        for name in stack.addresses:
            db = Database(stack.database_url(name))
            async with db.session() as s:
                backup[name] = [tuple(r) for r in (await s.execute(select(keys_table))).all()]
            await db.dispose()
        concern_copy = (
            await reporter.GetConcern(referrals_pb2.GetConcernRequest(concern_id=erased.concern_id))
        ).concern
        assert concern_copy.child.given_name == "Erasechild"
        db = Database(stack.database_url("referrals"))
        async with db.session() as s:
            c = referral_tables.concerns.c
            sealed_copy = (await s.execute(select(c.sealed).where(c.concern_id == erased.concern_id))).scalar_one()
        await db.dispose()

        # The copy decrypts with the keyring as it is now (so the check after the erasure means something).
        copy_db = Database(f"sqlite+aiosqlite:///{tmp_path / 'copy.db'}")
        copy_meta = MetaData()
        copy_keys = data_keys_table(copy_meta)
        await copy_db.run_sync(copy_meta.create_all)
        rows = [dict(zip(copy_keys.c.keys(), row, strict=True)) for row in backup["referrals"]]
        async with copy_db.transaction() as tx:
            await tx.execute(copy_keys.insert(), rows)

        async def open_copy() -> referrals_pb2.Concern:
            sealer = Sealer(DataKeys(copy_keys, FileKeyring(stack.keyring_file), "referrals"), registry())
            async with copy_db.session() as s:
                return await sealer.unseal(
                    s,
                    referrals_pb2.Concern(),
                    sealed_copy,
                    table="concerns",
                    record_id=f"{erased.concern_id}/1",  # bound to its owner, police
                )

        assert (await open_copy()).child.given_name == "Erasechild"

        databases = [f"--database={name}={stack.database_url(name)}" for name in stack.addresses]
        reason = "Concern recorded about the wrong child (test of erasure)."
        result = await asyncio.to_thread(
            csx, stack, "child", "erase", erased.child_id, "--basis", "recorded-in-error", "--reason", reason,
            "--requested-by", "dpo.one", "--approved-by", "dpo.two", f"--keyring={stack.keyring_file}",
            "--wait", "60", "--json", *databases,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        out = json.loads(result.stdout)
        assert out["applied"] == dict.fromkeys(stack.addresses, True) and out["shredded"]
        assert reason not in result.stdout + result.stderr

        def not_found(err: pytest.ExceptionInfo[grpc.aio.AioRpcError]) -> bool:
            return err.value.code() == grpc.StatusCode.NOT_FOUND

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await reporter.GetConcern(referrals_pb2.GetConcernRequest(concern_id=erased.concern_id), timeout=5)
        assert not_found(err)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await conferences.ListConferences(conferences_pb2.ListConferencesRequest(child_id=erased.child_id))
        assert not_found(err)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await conferences.GetConference(conferences_pb2.GetConferenceRequest(conference_id=listed[0].conference_id))
        assert not_found(err)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await plans.ListActionPlans(list_plans, timeout=5)
        assert not_found(err)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await panel.GetChildLinks(panel_pb2.GetChildLinksRequest(child_id=erased.child_id), timeout=5)
        assert not_found(err)
        still = await reporter.GetConcern(referrals_pb2.GetConcernRequest(concern_id=kept.concern_id), timeout=5)
        assert still.concern.child.given_name == "Keepchild"

    # Each service audited the erasure: requested and approved in referrals, applied everywhere else.
    from csx_common.audit import audit_tables

    audit_log = audit_tables(MetaData()).log.c
    for name in stack.addresses:
        db = Database(stack.database_url(name))
        async with db.session() as s:
            query = select(audit_log.actor_user_id, audit_log.rule_id).where(
                audit_log.child_id == erased.child_id, audit_log.action == "erase"
            )
            trail = sorted(tuple(r) for r in (await s.execute(query)).all())
        await db.dispose()
        if name == "referrals":
            assert trail == [("dpo.one", "erasure-requested"), ("dpo.two", "erasure-approved")]
        else:
            assert trail == [("dpo.two", "erasure-applied")], name
    # The copy taken before: its keys were wrapped by a KEK the keyring no longer holds.
    with pytest.raises(DataLossError):
        await open_copy()
    await copy_db.dispose()
