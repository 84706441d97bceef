"""The history checker (Jepsen's shape): what the workload attempted and what was acknowledged,
against what every service finally holds. After the system settles:

    lost        acknowledged, but absent where it must be (referrals, the panel, a conference, a plan)
    duplicated  an effect present more than once (two concerns for one reference, two conferences
                for one referral, two plans for one conference, two ConcernRecorded events)
    unexpected  present, but never attempted

must all be zero. Reads the services' databases directly: the checker is the operator here.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from sqlalchemy import select

from csx.referrals.v1 import events_pb2
from csx_actionplans import tables as plans
from csx_cli.stack import Stack
from csx_common.db import Database
from csx_conferences import tables as conferences
from csx_panel import tables as panel
from csx_referrals import tables as referrals
from tests.chaos.workload import History


@dataclass
class Counts:
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.unexpected)


@dataclass
class Verdict:
    attempted: int
    acknowledged: int
    routed: int
    concluded: int
    by_effect: dict[str, Counts]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.by_effect.values())

    def totals(self) -> tuple[int, int, int]:
        c = self.by_effect.values()
        return sum(len(x.lost) for x in c), sum(len(x.duplicated) for x in c), sum(len(x.unexpected) for x in c)

    def lines(self) -> list[str]:
        lost, dup, unexpected = self.totals()
        out = [
            f"attempted {self.attempted}, acknowledged {self.acknowledged}, routed {self.routed}, "
            f"concluded {self.concluded}",
            f"lost {lost}, duplicated {dup}, unexpected {unexpected}",
        ]
        for name, c in self.by_effect.items():
            found = f"lost {len(c.lost):>4}  duplicated {len(c.duplicated):>4}  unexpected {len(c.unexpected):>4}"
            out.append(f"  {name:<22} {found}")
            for label, items in (("lost", c.lost), ("duplicated", c.duplicated), ("unexpected", c.unexpected)):
                if items:
                    out.append(f"    {label}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}")
        return out


async def _rows(stack: Stack, service: str, query):  # type: ignore[no-untyped-def]
    db = Database(stack.database_url(service))
    try:
        async with db.session() as s:
            return (await s.execute(query)).all()
    finally:
        await db.dispose()


async def observe(stack: Stack, history: History) -> Verdict:
    run = history.run_id
    attempted = {o.ref for o in history.ops}
    acked = {o.ref: o for o in history.acknowledged}
    effects: dict[str, Counts] = {}

    # referrals: one concern per acknowledged reference, with the acknowledged id.
    c = referrals.concerns.c
    rows = await _rows(
        stack, "referrals", select(c.agency_reference, c.concern_id).where(c.agency_reference.like(f"CHAOS-{run}-%"))
    )
    per_ref = Counter(r.agency_reference for r in rows)
    ids = {r.agency_reference: r.concern_id for r in rows}
    concern_ids = set(ids.values())
    counts = effects["referrals.concerns"] = Counts()
    counts.lost = sorted(ref for ref, op in acked.items() if per_ref[ref] == 0 or ids[ref] != op.concern_id)
    counts.duplicated = sorted(ref for ref, n in per_ref.items() if n > 1)
    counts.unexpected = sorted(ref for ref in per_ref if ref not in attempted)

    # referrals' outbox: exactly one ConcernRecorded per concern.
    o = referrals.delivery.outbox.c
    events = await _rows(stack, "referrals", select(o.payload).where(o.subject == "csx.referrals.concern_recorded"))
    recorded = Counter(events_pb2.ConcernRecorded.FromString(e.payload).concern_id for e in events)
    counts = effects["referrals.events"] = Counts()
    counts.lost = sorted(cid for cid in concern_ids if recorded[cid] == 0)
    counts.duplicated = sorted(cid for cid in concern_ids if recorded[cid] > 1)

    # panel: every concern recorded once (concern_links), none it never heard of.
    p = panel.concern_links.c
    rows = await _rows(stack, "panel", select(p.concern_id))
    seen = Counter(r.concern_id for r in rows)
    counts = effects["panel.concern_links"] = Counts()
    counts.lost = sorted(o.concern_id for o in acked.values() if seen[o.concern_id] == 0)
    counts.duplicated = sorted(cid for cid, n in seen.items() if n > 1 and cid in concern_ids)
    every_concern = {r.concern_id for r in await _rows(stack, "referrals", select(c.concern_id))}
    counts.unexpected = sorted(cid for cid in seen if cid not in every_concern)  # a concern nobody recorded

    # conferences: one conference per routed referral.
    routed = {o.referral_id: o for o in history.acknowledged if o.routed}
    k = conferences.conferences.c
    referral_ids = {o.referral_id for o in history.acknowledged}
    rows = await _rows(stack, "conferences", select(k.referral_id, k.conference_id))
    per_referral = Counter(r.referral_id for r in rows if r.referral_id in referral_ids)
    counts = effects["conferences"] = Counts()
    counts.lost = sorted(rid for rid in routed if per_referral[rid] == 0)
    counts.duplicated = sorted(rid for rid, n in per_referral.items() if n > 1)
    counts.unexpected = sorted(rid for rid in per_referral if rid not in routed and not _maybe_routed(history, rid))
    conference_of = {r.referral_id: r.conference_id for r in rows}

    # actionplans: one plan per concluded conference.
    concluded = {conference_of.get(o.referral_id, "") for o in routed.values() if o.concluded} - {""}
    a = plans.action_plans.c
    ours = set(conference_of.values())
    rows = await _rows(stack, "actionplans", select(a.conference_id))
    per_conference = Counter(r.conference_id for r in rows if r.conference_id in ours)
    counts = effects["actionplans.plans"] = Counts()
    counts.lost = sorted(cid for cid in concluded if per_conference[cid] == 0)
    counts.duplicated = sorted(cid for cid, n in per_conference.items() if n > 1)
    counts.unexpected = sorted(cid for cid in per_conference if cid not in concluded and not _maybe_concluded(history))

    return Verdict(
        attempted=len(history.ops),
        acknowledged=len(acked),
        routed=len(routed),
        concluded=len(concluded),
        by_effect=effects,
    )


def _maybe_routed(history: History, referral_id: str) -> bool:
    """A decision that was attempted but not acknowledged may have happened: not unexpected."""
    return any(o.route and not o.routed and o.referral_id == referral_id for o in history.ops)


def _maybe_concluded(history: History) -> bool:
    return any(o.conclude and not o.concluded for o in history.ops)
