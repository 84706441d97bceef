"""Issue 3 in `make bench`: what disclosure (policy, clearing fields, audit) adds to a read, each
figure beside a plain read of the same record, measured in the same run.

The record: a police concern (intelligence graded B2, handling code P) about a child the school has
also raised a concern about, in a referral social care has routed to an intervention: that routing
is the school's basis for knowing the child (submitting is not), so its DSL may know the child but
not the police intelligence, the referrer or the narrative.

1. In-process, against a fresh SQLite database built by the referrals migrations (WAL,
   synchronous=FULL, the services' own `Database`), the reads interleaved one after another:
   - the plain read: repository get + decrypt in a read session (no policy, no audit);
   - `ReferralsService.get_concern` with no user (its transaction; no policy, no audit);
   - the same as a social worker (nothing cleared, audited) and as the DSL (fields cleared, allow and
     deny audited); the DSL read is also timed phase by phase.
2. Policy decisions in-process: one field and a 20-field record (tests/policy/benchmark.py), and the
   Concern's leaf fields decided for the DSL's real context (visible + decide_fields).
3. GetConcern over gRPC (mutual TLS, the Stack's referrals process), concurrency 1, interleaved: the
   same concern read with a CSX service certificate and no user (the service skips policy and audit:
   the plain read), by a social worker and by the DSL; then the plain and DSL reads at concurrency 16.
4. Audit append (SQLite, the in-process database): one append per transaction beside a transaction
   inserting one plain row, and µs per append when 20 share a transaction.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import Column, Integer, MetaData, String, Table

from benchmarks.support import Report, line, load, pct, us_line
from csx.referrals.v1 import referrals_pb2 as pb
from csx.referrals.v1 import referrals_pb2_grpc
from csx_cli.identity import user_channel
from csx_cli.stack import Stack
from csx_common.audit import AuditEntry, AuditLog
from csx_common.datakeys import DataKeys
from csx_common.db import Database
from csx_common.idempotency import IdempotencyKeys
from csx_common.identity import Principal
from csx_common.keyring import FileKeyring
from csx_common.messaging.outbox import Outbox
from csx_common.migrations import upgrade
from csx_common.sealing import Sealer
from csx_common.sensitivity import registry
from csx_common.unit_of_work import UnitsOfWork
from csx_referrals import tables
from csx_referrals.app import MIGRATIONS
from csx_referrals.repository import ReferralsRepository
from csx_referrals.service import ReferralsService
from csx_safeguarding.disclosure import Discloser
from csx_safeguarding.policy import DisclosureContext, PolicyEngine
from tests.policy.benchmark import measure as policy_measure

POLICE = Principal("bench.pc", "police", "police_officer", "action_delivery")
DSL = Principal("bench.dsl", "education", "dsl", "referral_screening")
SOCIAL = Principal("bench.sw", "social_care", "social_worker", "referral_screening")


def _child(tag: str) -> pb.ChildIdentity:
    return pb.ChildIdentity(given_name=f"Disclosure{tag}", family_name="Bench", date_of_birth="2011-03-09")


def police_concern(tag: str) -> pb.SubmitConcernRequest:
    return pb.SubmitConcernRequest(
        idempotency_key=f"bench-pol-{uuid.uuid4().hex}",
        agency=1,  # AGENCY_POLICE
        agency_reference=f"OCC-{tag}",
        referrer=pb.Referrer(
            name="PC Bench", role="Neighbourhood officer", email="pc.bench@police.example", phone="01632 960001"
        ),
        child=_child(tag),
        harm_types=[2, 3],
        contexts=[{"place_id": "plc-bench-park", "context_type": 3}],
        narrative="Seen with older youths near the station late at night; new phone and clothes. " * 3,
        intelligence=pb.IntelligenceGrading(
            source_grade=pb.SOURCE_GRADE_B, intelligence_grade=2, handling_code=pb.HANDLING_CODE_P
        ),
    )


def school_concern(tag: str) -> pb.SubmitConcernRequest:
    """The school's own concern about the same child (routed, it is the school's basis for the child)."""
    return pb.SubmitConcernRequest(
        idempotency_key=f"bench-edu-{uuid.uuid4().hex}",
        agency=3,  # AGENCY_EDUCATION
        agency_reference=f"EDU-{tag}",
        referrer=pb.Referrer(name="Bench Referrer", role="Designated safeguarding lead", email="dsl@school.example"),
        child=_child(tag),
        harm_types=[2],
        contexts=[{"place_id": "plc-bench-park", "context_type": 3}],
        narrative="Frequent absence; collected by an older male in a car.",
    )


def route(referral_id: str, tag: str) -> pb.RecordScreeningDecisionRequest:
    """Social care's screening decision routing the referral to an intervention: what opens the
    child's records to the agencies whose concerns it holds (tests/referrals/test_disclosure.py)."""
    return pb.RecordScreeningDecisionRequest(
        referral_id=referral_id,
        idempotency_key=f"bench-route-{tag}",
        outcome=pb.SCREENING_OUTCOME_INTERVENTION_B,
        reason="Extra-familial harm only: seen with older youths at the station.",
        decided_by=SOCIAL.user_id,
    )


async def interleaved(calls: dict[str, Callable[[], Awaitable[Any]]], rounds: int, warm: int) -> dict[str, list[float]]:
    """Each round calls every entry once, in turn, so all share the same conditions."""
    lat: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(warm + rounds):
        for name, call in calls.items():
            t0 = time.perf_counter()
            await call()
            if i >= warm:
                lat[name].append(time.perf_counter() - t0)
    return lat


def audited(entries: int) -> str:
    return f"{entries} audit entr{'y' if entries == 1 else 'ies'}"


def rate(lat: list[float]) -> float:
    return len(lat) / sum(lat)


def p50_ms(lat: list[float]) -> float:
    return pct(lat, 50) * 1e3


def best_us(fn: Callable[[], object], rounds: int, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(rounds):
            fn()
        best = min(best, (time.perf_counter() - start) / rounds)
    return best * 1e6


@dataclass
class Rig:
    """The referrals use cases in this process, on their own SQLite database."""

    db: Database
    repo: ReferralsRepository
    engine: PolicyEngine
    discloser: Discloser
    audit: AuditLog
    units: UnitsOfWork
    service: ReferralsService
    concern_id: str

    @classmethod
    async def create(cls, work_dir: Path) -> Rig:
        db = Database(f"sqlite+aiosqlite:///{work_dir / 'disclosure-bench.db'}")
        await upgrade(db, MIGRATIONS)
        keyring = FileKeyring.load_or_create(work_dir / "disclosure-bench-keyring.json")
        reg = registry()
        sealer = Sealer(DataKeys(tables.data_keys, keyring, "referrals"), reg)
        repo = ReferralsRepository(sealer, keyring.blind_index_key)
        engine = PolicyEngine.default()
        audit = AuditLog(tables.audit)
        discloser = Discloser(engine, reg, audit)
        units = UnitsOfWork(
            db,
            outbox=Outbox(tables.delivery),  # no relay here: the outbox rows simply stay
            sealer=sealer,
            idempotency=IdempotencyKeys(tables.idempotency, keyring.blind_index_key, sealer),
            audit=audit,
        )
        service = ReferralsService(units, repo, discloser)
        submitted = await service.submit_concern(POLICE, police_concern("inproc"))
        await service.submit_concern(DSL, school_concern("inproc"))
        await service.record_screening_decision(SOCIAL, route(submitted.referral_id, "inproc"))
        return cls(db, repo, engine, discloser, audit, units, service, submitted.concern_id)

    async def plain_read(self) -> pb.Concern:
        async with self.db.session() as s:
            concern = await self.repo.get_concern(s, self.concern_id)
        assert concern is not None
        return concern

    async def context(self, who: Principal) -> DisclosureContext:
        async with self.units.begin(who) as uow:
            concern = await self.repo.get_concern(uow.tx, self.concern_id)
            assert concern is not None
            # The service's own context builder (consent, sharing decisions, involvement, handling).
            return await self.service._disclosure_context(uow, who, concern.child_id, concern=concern)

    async def phased_read(self, who: Principal, phases: dict[str, list[float]]) -> None:
        """ReferralsService.get_concern's steps for a user allowed to see the record, timed apart."""
        t0 = time.perf_counter()
        async with self.units.begin(who) as uow:
            loaded = await self.repo.load_concern(uow.tx, self.concern_id)  # keys in hand, nothing decrypted
            assert loaded is not None
            concern = loaded.message
            t1 = time.perf_counter()
            context = await self.service._disclosure_context(uow, who, concern.child_id, concern=concern)
            t2 = time.perf_counter()
            assert self.discloser.visible(context).allowed
            disclosed = await self.discloser.disclose(
                uow.tx, concern, context, record_type="concern", record_id=self.concern_id, child_id=concern.child_id
            )
            loaded.decrypt_into(concern, {p for p, d in disclosed.decisions.items() if d.allowed}.__contains__)
            t3 = time.perf_counter()
        t4 = time.perf_counter()
        for name, dt in (("read", t1 - t0), ("context", t2 - t1), ("disclose", t3 - t2), ("commit", t4 - t3)):
            phases[name].append(dt)


async def in_process(rig: Rig, rounds: int, out: Report) -> tuple[DisclosureContext, dict[str, int], float]:
    """Prints the reads; returns the DSL's context, the Concern's leaf fields and the plain read's p50 (µs)."""
    dsl_view, dsl_redacted = await rig.service.get_concern(DSL, rig.concern_id)
    _, social_redacted = await rig.service.get_concern(SOCIAL, rig.concern_id)
    dsl_ctx, social_ctx = await rig.context(DSL), await rig.context(SOCIAL)
    leaves = {path: fc.data_class for path, fc in registry().leaf_fields(pb.Concern.DESCRIPTOR)}

    def entries(ctx: DisclosureContext) -> int:  # one audit entry per (allowed, rule, basis) group
        return len({(d.allowed, d.rule, d.lawful_basis or "") for d in rig.engine.decide_fields(ctx, leaves).values()})

    phases: dict[str, list[float]] = {"read": [], "context": [], "disclose": [], "commit": []}

    async def phased() -> None:
        await rig.phased_read(DSL, phases)

    lat = await interleaved(
        {
            "plain": rig.plain_read,
            "service": lambda: rig.service.get_concern(None, rig.concern_id),
            "social": lambda: rig.service.get_concern(SOCIAL, rig.concern_id),
            "dsl": lambda: rig.service.get_concern(DSL, rig.concern_id),
            "phased": phased,
        },
        rounds,
        warm=20,
    )
    n_dsl, n_social = entries(dsl_ctx), entries(social_ctx)
    out.append(f"GetConcern in-process (ReferralsService, SQLite), {rounds} interleaved reads each:")
    out.append(line("  plain read: repository get + decrypt", rate(lat["plain"]), lat["plain"]))
    out.append(line("  get_concern, no user (no policy, no audit)", rate(lat["service"]), lat["service"]))
    out.append(
        line(
            f"  social worker ({len(social_redacted)} cleared, {audited(n_social)})",
            rate(lat["social"]),
            lat["social"],
        )
    )
    out.append(line(f"  education DSL ({len(dsl_redacted)} cleared, {audited(n_dsl)})", rate(lat["dsl"]), lat["dsl"]))
    out.append(
        f"  DSL read by phase, p50: read {p50_ms(phases['read']):.2f} ms, context {p50_ms(phases['context']):.2f}"
        f" ms, policy+clear+audit+decrypt {p50_ms(phases['disclose']):.2f} ms, commit {p50_ms(phases['commit']):.2f} ms"
    )
    plain = p50_ms(lat["plain"])
    added_dsl, added_social = p50_ms(lat["dsl"]) - plain, p50_ms(lat["social"]) - plain
    out.append(
        f"  disclosure adds per record (p50, vs plain read): DSL +{added_dsl:.2f} ms, social worker +{added_social:.2f} ms"
    )
    assert dsl_view.concern_id == rig.concern_id and dsl_redacted and not social_redacted
    return dsl_ctx, leaves, pct(lat["plain"], 50) * 1e6


def policy(rig: Rig, dsl_ctx: DisclosureContext, leaves: dict[str, int], plain_us: float, out: Report) -> None:
    measured = policy_measure()
    concern_us = best_us(lambda: (rig.engine.visible(dsl_ctx), rig.engine.decide_fields(dsl_ctx, leaves)), 2000)
    out.append("Policy decisions, in-process (best of 5):")
    out.append(us_line("  one field (decide)", measured["per_field_us"]))
    out.append(
        us_line(f"  {int(measured['fields_per_record'])}-field record (decide_fields)", measured["per_record_us"])
    )
    out.append(us_line(f"  Concern, {len(leaves)} fields, DSL's context (+visible)", concern_us))
    out.append(us_line("  building a DisclosureContext", measured["context_build_us"]))
    out.append(us_line("  beside: plain read of the concern (p50)", plain_us))


async def over_grpc(stack: Stack, rounds: int, out: Report) -> None:
    address, pki = stack.addresses["referrals"], stack.pki
    async with (
        user_channel(address, POLICE, pki) as police_ch,
        user_channel(address, DSL, pki) as dsl_ch,
        user_channel(address, SOCIAL, pki) as social_ch,
    ):
        stubs = {
            name: referrals_pb2_grpc.ReferralsServiceStub(ch)
            for name, ch in (("social", social_ch), ("dsl", dsl_ch), ("police", police_ch))
        }
        # The transport alone: a health check over the same mutual-TLS channel (a service certificate
        # without a person reads no record at all).
        health = health_pb2_grpc.HealthStub(social_ch)
        submitted = await stubs["police"].SubmitConcern(police_concern("grpc"), timeout=30)
        await stubs["dsl"].SubmitConcern(school_concern("grpc"), timeout=30)
        await stubs["social"].RecordScreeningDecision(route(submitted.referral_id, "grpc"), timeout=30)
        request = pb.GetConcernRequest(concern_id=submitted.concern_id)
        cleared = {name: len((await stubs[name].GetConcern(request, timeout=10)).redacted_fields) for name in stubs}
        assert cleared["social"] == 0 and cleared["dsl"] > 0, cleared

        def reader(name: str) -> Callable[[], Awaitable[Any]]:
            if name == "plain":
                return lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            return lambda: stubs[name].GetConcern(request, timeout=10)

        lat = await interleaved({name: reader(name) for name in ("plain", "social", "dsl")}, rounds, warm=30)
        out.append(f"GetConcern over gRPC (mutual TLS, referrals process), concurrency 1, {rounds} interleaved each:")
        out.append(line("  health check, same channel (transport only)", rate(lat["plain"]), lat["plain"]))
        out.append(line("  social worker (0 cleared, audited)", rate(lat["social"]), lat["social"]))
        out.append(line(f"  education DSL ({cleared['dsl']} cleared, audited)", rate(lat["dsl"]), lat["dsl"]))
        plain = p50_ms(lat["plain"])
        out.append(
            f"  a whole read beyond the transport (p50): DSL +{p50_ms(lat['dsl']) - plain:.2f} ms,"
            f" social worker +{p50_ms(lat['social']) - plain:.2f} ms (compare the in-process plain read above)"
        )
        r, lt = await load(lambda _i: stubs["dsl"].GetConcern(request, timeout=30), rounds, 16)
        out.append(line("  education DSL, concurrency 16", r, lt))


async def audit_append(rig: Rig, rounds: int, out: Report) -> None:
    plain_md = MetaData()
    plain = Table("bench_plain", plain_md, Column("id", Integer, primary_key=True), Column("v", String(64)))
    await rig.db.run_sync(plain_md.create_all)
    entry = AuditEntry(
        actor_user_id=DSL.user_id,
        actor_agency=3,
        actor_role=DSL.role,
        purpose=DSL.purpose,
        action="read",
        decision="allow",
        rule_id="bench-rule",
        record_type="concern",
        record_id=rig.concern_id,
        child_id="chd-bench",
        field_names=["agency", "child.given_name", "concern_id", "harm_types", "recorded_at"],
    )
    ids = iter(range(10**9))

    async def plain_tx() -> None:
        async with rig.db.transaction() as s:
            await s.execute(plain.insert(), {"id": next(ids), "v": "x" * 64})

    async def append_tx() -> None:
        async with rig.db.transaction() as s:
            await rig.audit.append(s, entry)

    lat = await interleaved({"plain": plain_tx, "append": append_tx}, rounds, warm=20)
    batches, per_batch, in_tx = max(10, rounds // 20), 20, []
    for _ in range(batches):
        async with rig.db.transaction() as s:
            t0 = time.perf_counter()
            for _ in range(per_batch):
                await rig.audit.append(s, entry)
            in_tx.append((time.perf_counter() - t0) / per_batch)
    out.append(f"Audit append (SQLite, synchronous=FULL), {rounds} transactions each, interleaved:")
    out.append(line("  transaction inserting one plain row", rate(lat["plain"]), lat["plain"]))
    out.append(line("  transaction appending one audit entry", rate(lat["append"]), lat["append"]))
    out.append(
        us_line(
            "  one append, 20 in one transaction (p50)",
            pct(in_tx, 50) * 1e6,
            f"(commit excluded; append adds {(p50_ms(lat['append']) - p50_ms(lat['plain'])):+.2f} ms p50 per transaction)",
        )
    )


async def bench_disclosure(stack: Stack, work_dir: Path, n: int, out: Report) -> None:
    out.append("-- Disclosure, policy and audit (issue 3) --")
    rig = await Rig.create(work_dir)
    try:
        rounds = min(500, max(200, n // 4))  # the whole of `make bench` stays within ~3 minutes
        dsl_ctx, leaves, plain_us = await in_process(rig, rounds, out)
        policy(rig, dsl_ctx, leaves, plain_us, out)
        await over_grpc(stack, rounds, out)
        await audit_append(rig, rounds * 2, out)
    finally:
        await rig.db.dispose()
