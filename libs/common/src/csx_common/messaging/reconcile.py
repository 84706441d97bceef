"""Reconciliation: compare a producer's published outbox with its consumers' inboxes, and put back on
the stream whatever a consumer never received — so a broker that loses acknowledged messages (a
deleted or corrupted stream message, a restored broker volume) cannot lose a concern.

For each consumer (durable name, its database, the subjects it handles) the outbox is paged through
by event id; each page's ids are looked up in the consumer's `inbox` and `dead_letters` with
`IN (...)`. An event published longer than `settle` seconds ago that the consumer handles is then:

- applied: in its inbox;
- parked: in its dead_letters — not missing, it waits for an operator (`csx deadletters`);
- too old: neither, but published longer ago than the stream keeps messages (`max_age`). Retention is
  the stream's promise: a consumer that has not applied an event within it was away (or created)
  for longer than the partnership keeps messages, and a backfill of history is an operator's
  decision, not a timer's. Reported (with ids), never republished;
- missing: neither. Republished, unless `dry_run`.

A republish is exactly what the relay sent: same subject, payload and headers (event type, trace
context) and `Nats-Msg-Id` = event id. What JetStream does with it decides what happens next:

- stored (a new sequence): the broker had lost the message and forgotten its id — it comes back.
- duplicate of sequence `s` (within the stream's duplicate window, 2 h here): the broker remembers
  the id. If the stream still holds `s` and the consumer's ack floor is below it, the consumer is
  merely behind: `pending`, nothing to do. Otherwise the message is gone (deleted, lost; JetStream
  keeps the id in its duplicate table even when the message itself is deleted) or the consumer
  moved past it without applying it (its database restored from a backup): a copy is published with
  `Nats-Msg-Id` = `<event id>~<s>` and `Csx-Event-Id` = event id. Consumers key their inbox on
  `Csx-Event-Id` when present, so the copy is the same event to them; the derived id is
  deterministic, so two reconcilers running at once store one copy, and a copy lost in turn gets
  its own (`~<copy's sequence>`), up to MAX_COPIES.

Redelivery: a republish that is stored — after the duplicate window, or as a copy — reaches every
consumer of the stream whose filter matches the subject, not only the one that missed it. That is
correct: each consumer's inbox already holds the event and skips it (acks, no effect); only the one
that missed it applies it. Past the duplicate window this includes a consumer that is merely far
behind (down for hours): it then receives the event twice and applies it once.

The job only reads the databases (inbox, dead_letters, outbox) and only publishes on the producer's
own subjects: it can run as the producer service's NATS user (stream information on its own stream
is all it needs besides publishing); consumer information (ack floors) needs a user allowed
`CONSUMER.INFO` on the stream, such as the operator (`consumer_js`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError
from sqlalchemy import MetaData, Table, select

from csx_common.db import Database
from csx_common.messaging.events import EVENT_ID_HEADER, EVENT_TYPE_HEADER, MSG_ID_HEADER
from csx_common.messaging.tables import PUBLISHED, DeliveryTables

log = structlog.get_logger("csx.reconcile")

DEFAULT_SETTLE_SECONDS = 30.0
DEFAULT_PAGE_SIZE = 500
# Copies of one event published in one run before giving up (each one lost in turn).
MAX_COPIES = 8
# Event ids listed per (producer, consumer) and kind in a report; the counts are always complete.
MAX_LISTED_IDS = 100
COPY_SEPARATOR = "~"

REPUBLISHED = "republished"
PENDING = "pending"
FAILED = "failed"


def _delivery_tables() -> DeliveryTables:
    return DeliveryTables(MetaData())


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` one token, `>` one or more trailing tokens."""
    want, have = pattern.split("."), subject.split(".")
    for i, part in enumerate(want):
        if part == ">":
            return len(have) > i
        if i >= len(have) or part not in ("*", have[i]):
            return False
    return len(want) == len(have)


@dataclass(frozen=True)
class Producer:
    """A service whose outbox feeds `stream`."""

    name: str
    db: Database
    stream: str
    tables: DeliveryTables = field(default_factory=_delivery_tables)


@dataclass(frozen=True)
class Consumer:
    """A durable consumer of the producer's stream: its inbox and dead letters live in `db`, and it
    handles `subjects` (its routes; NATS wildcards allowed)."""

    durable: str
    db: Database
    subjects: tuple[str, ...]
    tables: DeliveryTables = field(default_factory=_delivery_tables)

    def handles(self, subject: str) -> bool:
        return any(subject_matches(p, subject) for p in self.subjects)


@dataclass
class PairReport:
    """One (producer, consumer) pair. `checked` events were published before the settle time and
    handled by the consumer; of those not applied, each is `parked`, `too_old` or `missing`; each
    missing one was `republished`, is `pending` (the stream holds it, the consumer is behind) or
    `failed` (the broker did not take it) — or none of these in a dry run."""

    producer: str
    consumer: str
    checked: int = 0
    missing: int = 0
    republished: int = 0
    pending: int = 0
    parked: int = 0
    too_old: int = 0
    failed: int = 0
    missing_ids: list[str] = field(default_factory=list)
    too_old_ids: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def ok(self) -> bool:
        """Nothing needs a person: no error, nothing failed, nothing beyond retention."""
        return not (self.error or self.failed or self.too_old)


@dataclass
class ReconcileReport:
    pairs: list[PairReport] = field(default_factory=list)
    dry_run: bool = False
    settle: float = DEFAULT_SETTLE_SECONDS

    def pair(self, producer: str, consumer: str) -> PairReport:
        for p in self.pairs:
            if (p.producer, p.consumer) == (producer, consumer):
                return p
        raise KeyError((producer, consumer))

    def total(self, name: str) -> int:
        return sum(int(getattr(p, name)) for p in self.pairs)

    @property
    def ok(self) -> bool:
        """Every pair ok; in a dry run, also nothing missing."""
        return all(p.ok for p in self.pairs) and not (self.dry_run and self.total("missing"))

    def extend(self, other: ReconcileReport) -> None:
        self.pairs.extend(other.pairs)

    def to_json(self) -> dict[str, Any]:
        kinds = ("checked", "missing", "republished", "pending", "parked", "too_old", "failed")
        return {
            "ok": self.ok,
            "dry_run": self.dry_run,
            "settle_seconds": self.settle,
            "totals": {k: self.total(k) for k in kinds},
            "pairs": [asdict(p) | {"ok": p.ok} for p in self.pairs],
        }


class _Stream:
    """What the broker holds of one stream: max age, and which sequences are still stored."""

    def __init__(self, js: JetStreamContext, name: str) -> None:
        self._js = js
        self.name = name
        self._state: js_api.StreamState | None = None
        self._gone: set[int] = set()

    async def info(self) -> js_api.StreamInfo:
        # Stream information with the list of deleted sequences (interior deletes). Requested
        # directly: nats-py's stream_info() cannot ask for deleted_details. Only STREAM.INFO on the
        # producer's own stream is needed, which its service user may do.
        js: Any = self._js
        response = await js._api_request(
            f"{js._prefix}.STREAM.INFO.{self.name}", json.dumps({"deleted_details": True}).encode(), timeout=js._timeout
        )
        info: js_api.StreamInfo = js_api.StreamInfo.from_response(response)
        self._state = info.state
        self._gone = set(info.state.deleted or ())
        if info.state.lost and info.state.lost.msgs:
            self._gone.update(info.state.lost.msgs)
        return info

    async def holds(self, seq: int) -> bool:
        if self._state is None or seq > self._state.last_seq:
            await self.info()
        state = self._state
        assert state is not None
        return state.first_seq <= seq <= state.last_seq and seq not in self._gone


class _Republisher:
    def __init__(
        self, js: JetStreamContext, stream: _Stream, consumer_js: JetStreamContext, timeout: float, logger: Any
    ) -> None:
        self._log = logger
        self._js = js
        self._stream = stream
        self._consumer_js = consumer_js
        self._timeout = timeout
        self._ack_floors: dict[str, int] = {}
        self.broken = ""

    async def _ack_floor(self, durable: str) -> int:
        """The stream sequence below which the consumer has acknowledged everything (0 if it does not
        exist yet: declared, it starts from the beginning of the stream). A snapshot per run: an
        older floor only makes the answer more cautious."""
        if durable not in self._ack_floors:
            floor = 0
            try:
                info = await self._consumer_js.consumer_info(self._stream.name, durable)
                floor = info.ack_floor.stream_seq if info.ack_floor else 0
            except NotFoundError:
                floor = 0
            except Exception as exc:
                # Cannot tell (no permission, broker slow): assume it is behind, so nothing is copied.
                self._log.warning("reconcile_consumer_info_failed", durable=durable, error=type(exc).__name__)
            self._ack_floors[durable] = floor
        return self._ack_floors[durable]

    async def restore(self, row: Any, consumers: Sequence[Consumer]) -> str:
        if self.broken:
            return FAILED
        headers = {**(row.headers or {}), MSG_ID_HEADER: row.event_id, EVENT_TYPE_HEADER: row.event_type}
        try:
            for _ in range(MAX_COPIES):
                ack = await self._js.publish(row.subject, row.payload, headers=headers, timeout=self._timeout)
                if not ack.duplicate:
                    self._log.info(
                        "reconcile_republished",
                        event_id=row.event_id,
                        msg_id=headers[MSG_ID_HEADER],
                        stream=ack.stream,
                        seq=ack.seq,
                        consumers=[c.durable for c in consumers],
                    )
                    return REPUBLISHED
                if await self._stream.holds(ack.seq):
                    floors = [await self._ack_floor(c.durable) for c in consumers]
                    if all(floor < ack.seq for floor in floors):
                        return PENDING  # in the stream, ahead of every consumer that lacks it
                # Gone from the stream though the broker remembers its id, or passed over: a copy.
                headers = {
                    **headers,
                    MSG_ID_HEADER: f"{row.event_id}{COPY_SEPARATOR}{ack.seq}",
                    EVENT_ID_HEADER: row.event_id,
                }
        except Exception as exc:
            self.broken = f"publish failed: {type(exc).__name__}"
            self._log.error("reconcile_publish_failed", event_id=row.event_id, error=type(exc).__name__)
            return FAILED
        self._log.error("reconcile_copies_exhausted", event_id=row.event_id, copies=MAX_COPIES)
        return FAILED


def _aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; every timestamp written here is UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


async def _outbox_pages(
    producer: Producer,
    consumers: Sequence[Consumer],
    cutoff: datetime,
    since: datetime | None,
    page_size: int,
) -> AsyncIterator[Sequence[Any]]:
    """Published events before `cutoff` (and from `since`), a page at a time, by event id."""
    o = producer.tables.outbox.c
    query = select(o.event_id, o.subject, o.published_at).where(o.status == PUBLISHED, o.published_at < cutoff)
    if since is not None:
        query = query.where(o.published_at >= since)
    subjects = {s for c in consumers for s in c.subjects}
    if not any("*" in s or ">" in s for s in subjects):
        query = query.where(o.subject.in_(sorted(subjects)))
    after = ""
    while True:
        async with producer.db.session() as session:
            page = (await session.execute(query.where(o.event_id > after).order_by(o.event_id).limit(page_size))).all()
        if not page:
            return
        yield page
        if len(page) < page_size:
            return
        after = page[-1].event_id


async def _held(db: Database, table: Table, durable: str, ids: list[str]) -> set[str]:
    """Which of `ids` the consumer's inbox (or dead_letters) holds."""
    c = table.c
    async with db.session() as session:
        rows = await session.execute(select(c.msg_id).where(c.consumer == durable, c.msg_id.in_(ids)).distinct())
        return {r.msg_id for r in rows}


async def reconcile(
    producer: Producer,
    consumers: Sequence[Consumer],
    js: JetStreamContext,
    *,
    settle: float = DEFAULT_SETTLE_SECONDS,
    dry_run: bool = False,
    lookback: float | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    consumer_js: JetStreamContext | None = None,
    publish_timeout: float = 5.0,
    now: datetime | None = None,
    logger: Any = None,
) -> ReconcileReport:
    """Find the events of `producer` that `consumers` never received, and republish them.

    `js` publishes on the producer's subjects and reads its stream's information; `consumer_js`
    (default `js`) reads the consumers' ack floors. `settle`: seconds an event must have been
    published before it counts as missing (normal delivery lag is not a loss). `lookback`: only
    events published within this many seconds (default: the whole outbox). `dry_run`: report what
    is missing, publish nothing. `logger`: a structlog logger (default `csx.reconcile`); republished
    and unrecoverable events are logged by id. `now` is for tests.
    """
    logger = logger or log
    now = now or datetime.now(UTC)
    report = ReconcileReport([PairReport(producer.name, c.durable) for c in consumers], dry_run=dry_run, settle=settle)
    pairs = {c.durable: p for c, p in zip(consumers, report.pairs, strict=True)}
    if not consumers:
        return report
    stream = _Stream(js, producer.stream)
    horizon: datetime | None = None
    can_publish = not dry_run
    stream_known = False

    async def learn_stream() -> None:
        # Asked once, and only when some event is not applied: an unused stream need not exist.
        nonlocal horizon, can_publish, stream_known
        stream_known = True
        try:
            max_age = (await stream.info()).config.max_age or 0
            horizon = now - timedelta(seconds=max_age) if max_age else None
        except Exception as exc:
            # Without the stream nothing can be republished (nor aged); what is missing is still counted.
            can_publish = False
            for p in report.pairs:
                p.error = f"stream {producer.stream}: {type(exc).__name__}"

    republisher = _Republisher(js, stream, consumer_js or js, publish_timeout, logger)
    cutoff = now - timedelta(seconds=settle)
    since = now - timedelta(seconds=lookback) if lookback is not None else None

    async for page in _outbox_pages(producer, consumers, cutoff, since, page_size):
        lacking: dict[str, list[Consumer]] = {}
        for consumer in consumers:
            rows = [r for r in page if consumer.handles(r.subject)]
            if not rows:
                continue
            pair = pairs[consumer.durable]
            ids = [r.event_id for r in rows]
            pair.checked += len(ids)
            applied = await _held(consumer.db, consumer.tables.inbox, consumer.durable, ids)
            parked = await _held(consumer.db, consumer.tables.dead_letters, consumer.durable, ids)
            for row in rows:
                if row.event_id in applied:
                    continue
                if not stream_known:
                    await learn_stream()
                if row.event_id in parked:
                    pair.parked += 1
                elif horizon is not None and _aware(row.published_at) < horizon:
                    pair.too_old += 1
                    if len(pair.too_old_ids) < MAX_LISTED_IDS:
                        pair.too_old_ids.append(row.event_id)
                else:
                    pair.missing += 1
                    if len(pair.missing_ids) < MAX_LISTED_IDS:
                        pair.missing_ids.append(row.event_id)
                    lacking.setdefault(row.event_id, []).append(consumer)
        if not lacking or not can_publish:
            continue
        o = producer.tables.outbox.c
        async with producer.db.session() as session:
            full = (
                await session.execute(
                    select(o.event_id, o.subject, o.event_type, o.payload, o.headers)
                    .where(o.event_id.in_(list(lacking)))
                    .order_by(o.event_id)
                )
            ).all()
        # One publish serves every consumer that lacks the event (each consumer of the stream gets it).
        for row in full:
            outcome = await republisher.restore(row, lacking[row.event_id])
            for consumer in lacking[row.event_id]:
                pair = pairs[consumer.durable]
                setattr(pair, outcome, getattr(pair, outcome) + 1)
                if outcome == FAILED and republisher.broken:
                    pair.error = pair.error or republisher.broken
    for pair in report.pairs:
        if pair.missing or pair.too_old or pair.parked:
            logger.info("reconcile_pair", **{k: v for k, v in asdict(pair).items() if not k.endswith("_ids")})
    return report
