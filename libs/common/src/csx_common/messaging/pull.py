"""The one durable JetStream pull-consumer loop. Every consumer here (the inbox consumers of events
between services, sealed intake) fetches, waits out outages and stops through it; what a consumer
does with a message (decode, check, apply; how a failure is answered) is its `handle`, which
settles the message itself (ack, nak or term).

- A batch's messages are handled one after another (in stream order) or, for independent
  messages, all at once.
- While a batch is in hand, its unsettled messages are marked in progress (+WPI) every third of the
  ack wait, so the broker does not redeliver a message that is still being handled, however long
  the batch takes.
- Broker or stream away: fetch failures back off (doubling up to `BACKOFF_MAX`; a quiet fetch is
  not a failure), and after a JetStream API error (its consumer or stream deleted, the broker's
  store lost) the consumer is declared again, as often as it takes, until the stream is back.
- Stop never abandons a message in hand: the messages being handled are finished and settled (in
  a concurrent batch that is all of them), and those of the batch not started are handed back
  (nak: redelivered at once, to this service's next run or another replica). A fetch the broker
  has sent nothing for yet is dropped at once, with the subscription (the broker then drops a pull
  request nobody listens to); one that has brought something is let end. Only a handler still
  running after `grace` is cancelled, and its message handed back. (A message the broker sends in
  the instant between a dropped fetch and the end of the subscription comes back after the ack
  wait, as for any consumer that goes away.)
- A handler that raises (it should settle its message itself) does not end the loop: its message
  is left to the ack wait.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator, Sequence

import structlog
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import APIError
from opentelemetry import trace
from opentelemetry.context import Context

from csx_common import telemetry

log = structlog.get_logger("csx.consumer")

FETCH_TIMEOUT = 1.0
# Seconds between fetches that failed: the first wait, doubled after each failure up to the last.
BACKOFF_FIRST = 0.25
BACKOFF_MAX = 5.0
# How long stop() lets the messages in hand finish: under the runtime's bound on a shutdown step.
STOP_GRACE = 8.0

Handle = Callable[[Msg], Awaitable[None]]
Hook = Callable[[], Awaitable[None]]


def retry_delay(backoff: Sequence[float], deliveries: int) -> float:
    """Seconds before the next delivery of a message that failed on its `deliveries`-th (the last
    value of `backoff` repeats)."""
    return backoff[min(max(deliveries, 1), len(backoff)) - 1]


@contextlib.contextmanager
def processing(
    name: str, msg: Msg, durable: str, *, parent: Context | None = None, **attributes: str | int
) -> Iterator[trace.Span]:
    """The span of one message's handling (OpenTelemetry's messaging conventions)."""
    with telemetry.tracer().start_as_current_span(
        name,
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes={
            "messaging.system": "nats",
            "messaging.operation.type": "process",
            "messaging.destination.name": msg.subject,
            "messaging.consumer.group.name": durable,
            **attributes,
        },
    ) as span:
        yield span


def record_failure(span: trace.Span, exc: BaseException) -> None:
    # The type only: an exception's text and stack trace may hold values (SQL parameters).
    span.add_event("exception", {"exception.type": type(exc).__name__})
    span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))


class PullLoop:
    """One durable pull consumer of `stream` (filtered to `subjects`), run by a task of its own:
    `declare()`, `start()`, `stop()`. `idle` runs after a fetch that found nothing; `before_declare`
    before the consumer is declared (or declared again), for the consumer that owns its stream."""

    def __init__(
        self,
        js: JetStreamContext,
        *,
        stream: str,
        durable: str,
        subjects: Sequence[str],
        handle: Handle,
        ack_wait: float,
        batch: int,
        concurrent: bool = False,
        idle: Hook | None = None,
        before_declare: Hook | None = None,
        fetch_timeout: float = FETCH_TIMEOUT,
    ) -> None:
        self._js, self.stream, self.durable = js, stream, durable
        self._config = js_api.ConsumerConfig(
            durable_name=durable,
            ack_policy=js_api.AckPolicy.EXPLICIT,
            deliver_policy=js_api.DeliverPolicy.ALL,
            ack_wait=ack_wait,
            # No server-side cap: each consumer decides when a message is given up on (parked in
            # dead_letters; never, for a sealed concern). A server cap would stop delivery silently.
            max_deliver=-1,
            filter_subjects=list(subjects),
            max_ack_pending=1000,
        )
        self._handle, self._batch, self._concurrent = handle, batch, concurrent
        self._idle, self._before_declare, self._fetch_timeout = idle, before_declare, fetch_timeout
        self._in_progress_every = ack_wait / 3
        self._sub: JetStreamContext.PullSubscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._lost = False  # the broker may no longer know the consumer: declare it again
        self._fetch_began: int | None = None  # messages the subscription had had when a fetch began
        self.failures = 0  # fetches failed in a row

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def declare(self) -> None:
        await self._declare_consumer()
        self._sub = await self._js.pull_subscribe_bind(durable=self.durable, stream=self.stream)

    async def _declare_consumer(self) -> None:
        if self._before_declare is not None:
            await self._before_declare()
        await self._js.add_consumer(self.stream, self._config)

    def start(self) -> None:
        if self._sub is None:
            raise RuntimeError("declare the consumer before starting it")
        self._stopping = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name=f"consumer-{self.durable}")

    async def stop(self, grace: float = STOP_GRACE) -> None:
        self._stopping.set()
        task, self._task = self._task, None
        if task is not None:
            if self._waiting_for_nothing():
                task.cancel()  # a fetch that has brought nothing yet: nothing of it to lose
            try:
                await asyncio.wait({task}, timeout=grace)
            except BaseException:
                task.cancel()  # stop() itself cancelled (a bounded shutdown step): end the loop too
                raise
            if not task.done():
                log.warning("consumer_stop_forced", consumer=self.durable, grace=grace)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            elif not task.cancelled() and task.exception() is not None:
                log.error("consumer_loop_failed", consumer=self.durable, error=type(task.exception()).__name__)
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()  # the broker drops a pull request nobody listens to any more

    def _waiting_for_nothing(self) -> bool:
        """Whether the loop is in a fetch that the broker has sent nothing for (not a message, not
        a status) since it began."""
        return self._sub is not None and self._fetch_began is not None and self._sub.delivered == self._fetch_began

    async def _run(self) -> None:
        while not self._stopping.is_set():
            msgs = await self._fetch()
            if msgs:
                await self._handle_batch(msgs)

    async def _fetch(self) -> list[Msg]:
        if self._lost:
            try:
                await self._declare_consumer()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self._failed(exc)  # the stream is not back yet
                return []
            self._lost = False
            log.info("consumer_declared_again", consumer=self.durable, stream=self.stream)
        try:
            msgs = await self._fetch_marked()
        except (NatsTimeoutError, TimeoutError):
            msgs = []
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._lost = self._lost or isinstance(exc, APIError)
            await self._failed(exc)
            return []
        self._recovered()
        if not msgs:
            await self._quiet()
        return msgs

    async def _fetch_marked(self) -> list[Msg]:
        """One fetch, marked for stop() while it lasts (see _waiting_for_nothing)."""
        assert self._sub is not None
        self._fetch_began = self._sub.delivered
        try:
            return await self._sub.fetch(self._batch, timeout=self._fetch_timeout)
        finally:
            self._fetch_began = None

    async def _failed(self, exc: Exception) -> None:
        self.failures += 1
        log.warning("consumer_fetch_failed", consumer=self.durable, error=type(exc).__name__, failures=self.failures)
        await self._pause(min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self.failures - 1)))

    def _recovered(self) -> None:
        if self.failures:
            log.info("consumer_fetch_recovered", consumer=self.durable, failures=self.failures)
            self.failures = 0

    async def _quiet(self) -> None:
        if self._idle is None or self._stopping.is_set():
            return
        try:
            await self._idle()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("consumer_idle_work_failed", consumer=self.durable, error=type(exc).__name__)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _handle_batch(self, msgs: list[Msg]) -> None:
        unsettled = {id(m): m for m in msgs}
        keeper = asyncio.create_task(self._keep_in_progress(unsettled), name=f"consumer-{self.durable}-wpi")
        try:
            if self._concurrent:
                if not self._stopping.is_set():
                    await asyncio.gather(*(self._handle_one(m, unsettled) for m in msgs))
            else:
                for msg in msgs:
                    if self._stopping.is_set():
                        break
                    await self._handle_one(msg, unsettled)
        finally:
            keeper.cancel()
            # Not started (stopping), or cancelled mid-way (stop's grace ran out): handed back now
            # rather than after the ack wait.
            for msg in unsettled.values():
                with contextlib.suppress(Exception):
                    await msg.nak()

    async def _handle_one(self, msg: Msg, unsettled: dict[int, Msg]) -> None:
        try:
            await self._handle(msg)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A handler settles its messages itself; this one is left to the ack wait, and the loop goes on.
            log.error("consumer_handler_failed", consumer=self.durable, error=type(exc).__name__)
        del unsettled[id(msg)]

    async def _keep_in_progress(self, unsettled: dict[int, Msg]) -> None:
        while True:
            await asyncio.sleep(self._in_progress_every)
            for msg in list(unsettled.values()):
                with contextlib.suppress(Exception):
                    await msg.in_progress()
