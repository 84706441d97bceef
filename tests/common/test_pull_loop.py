"""The one pull-consumer loop (csx_common.messaging.pull) against a real nats-server: stopping during a
fetch or a handler, ack wait while a batch is in hand, the broker and the stream going away and
coming back."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from csx_common.messaging.pull import PullLoop
from csx_common.natsserver import NatsServer
from tests.support import eventually


class Rig:
    """A stream of its own on a real nats-server, and the loops of one durable on it."""

    def __init__(self, nc: NATS, js: JetStreamContext) -> None:
        self.nc, self.js = nc, js
        tag = uuid.uuid4().hex[:8]
        self.stream, self.subject, self.durable = f"PULL_{tag}", f"pull.{tag}.work", f"pull-{tag}"
        self.loops: list[PullLoop] = []

    async def create_stream(self) -> None:
        await self.js.add_stream(name=self.stream, subjects=[self.subject])

    async def publish(self, *payloads: bytes) -> None:
        for payload in payloads:
            await self.js.publish(self.subject, payload)

    async def loop(
        self, handle: Callable[[Msg], Awaitable[None]], *, ack_wait: float = 30.0, batch: int = 8, **kw: Any
    ) -> PullLoop:
        """A loop of the durable, declared and started."""
        loop = PullLoop(
            self.js,
            stream=self.stream,
            durable=self.durable,
            subjects=[self.subject],
            handle=handle,
            ack_wait=ack_wait,
            batch=batch,
            **kw,
        )
        await loop.declare()
        loop.start()
        self.loops.append(loop)
        return loop

    async def unsettled(self) -> int:
        info = await self.js.consumer_info(self.stream, self.durable)
        return int(info.num_ack_pending + info.num_pending)


class Recorder:
    """A handler that records each message (payload and delivery count) and acks it."""

    def __init__(self) -> None:
        self.seen: list[tuple[bytes, int]] = []

    async def __call__(self, msg: Msg) -> None:
        self.seen.append((msg.data, msg.metadata.num_delivered))
        await msg.ack()

    def payloads(self) -> list[bytes]:
        return [data for data, _ in self.seen]


async def _connected(url: str) -> NATS:
    return await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)


@pytest.fixture
async def rig(nats_url: str) -> AsyncIterator[Rig]:
    nc = await _connected(nats_url)
    rig = Rig(nc, nc.jetstream(timeout=2))
    await rig.create_stream()
    yield rig
    for loop in rig.loops:
        await loop.stop()
    await rig.js.delete_stream(rig.stream)
    await nc.close()


async def until(predicate: Callable[[], bool], within: float = 10.0) -> None:
    async def check() -> bool:
        return predicate()

    await eventually(check, within=within)


async def test_a_batch_is_handled_in_stream_order_and_settled(rig: Rig) -> None:
    seen = Recorder()
    await rig.publish(*(b"m%d" % i for i in range(12)))
    await rig.loop(seen, batch=5)
    await until(lambda: len(seen.seen) == 12)
    assert seen.payloads() == [b"m%d" % i for i in range(12)]
    assert await rig.unsettled() == 0


async def test_stop_during_a_fetch_is_prompt_and_leaves_the_broker_nothing_pending(rig: Rig) -> None:
    first = Recorder()
    loop = await rig.loop(first, fetch_timeout=5.0)
    await asyncio.sleep(0.3)  # the loop is waiting in a fetch the broker has sent nothing for
    began = asyncio.get_running_loop().time()
    await loop.stop()
    assert asyncio.get_running_loop().time() - began < 0.5  # not the 5 s the fetch would have lasted
    assert not loop.running
    # The fetch's pull request went with the subscription: the next message is not delivered to it
    # (which would leave it to the 30 s ack wait) but to the next run, at once and for the first time.
    await rig.publish(b"after-the-stop")
    second = Recorder()
    await rig.loop(second)
    await until(lambda: second.seen == [(b"after-the-stop", 1)], within=5)
    assert first.seen == [] and await rig.unsettled() == 0


async def test_stop_finishes_the_message_in_hand_and_hands_back_the_rest(rig: Rig) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    handled: list[bytes] = []

    async def slow(msg: Msg) -> None:
        started.set()
        await release.wait()
        handled.append(msg.data)
        await msg.ack()

    await rig.publish(b"in-hand", b"not-started")
    loop = await rig.loop(slow)
    await asyncio.wait_for(started.wait(), 5)
    stopping = asyncio.create_task(loop.stop())
    await asyncio.sleep(0.5)
    assert not stopping.done()  # waiting for the handler, not cancelling it
    release.set()
    await asyncio.wait_for(stopping, 5)
    assert handled == [b"in-hand"]
    second = Recorder()
    await rig.loop(second)
    await until(lambda: second.payloads() == [b"not-started"], within=5)  # at once: nak'ed, not left to the ack wait
    assert await rig.unsettled() == 0


async def test_a_handler_stuck_past_the_grace_is_cancelled_and_its_message_handed_back(rig: Rig) -> None:
    cancelled = asyncio.Event()

    async def stuck(msg: Msg) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    await rig.publish(b"stuck")
    loop = await rig.loop(stuck)
    await until(lambda: loop.running)
    await asyncio.sleep(0.5)
    began = asyncio.get_running_loop().time()
    await loop.stop(grace=0.5)
    assert asyncio.get_running_loop().time() - began < 2.0
    assert cancelled.is_set()
    second = Recorder()
    await rig.loop(second)
    await until(lambda: second.payloads() == [b"stuck"], within=5)


async def test_the_ack_wait_does_not_run_out_while_a_batch_is_in_hand(rig: Rig) -> None:
    """Each message takes longer than the ack wait, and the last waits three of them to be started:
    none is redelivered meanwhile."""
    calls: list[tuple[bytes, int]] = []

    async def slow(msg: Msg) -> None:
        calls.append((msg.data, msg.metadata.num_delivered))
        await asyncio.sleep(1.5)
        await msg.ack()

    await rig.publish(b"a", b"b", b"c")
    await rig.loop(slow, ack_wait=1.0)
    await until(lambda: len(calls) == 3, within=15)
    await asyncio.sleep(2.0)  # a redelivery would have come by now
    assert calls == [(b"a", 1), (b"b", 1), (b"c", 1)]
    info = await rig.js.consumer_info(rig.stream, rig.durable)
    assert info.num_redelivered == 0 and info.num_ack_pending == 0


async def test_a_handler_that_raises_does_not_end_the_loop(rig: Rig) -> None:
    calls: list[tuple[bytes, int]] = []

    async def fragile(msg: Msg) -> None:
        calls.append((msg.data, msg.metadata.num_delivered))
        if msg.data == b"bad" and msg.metadata.num_delivered == 1:
            raise RuntimeError("a bug in the handler")
        await msg.ack()

    await rig.publish(b"bad", b"good")
    loop = await rig.loop(fragile, ack_wait=1.0)
    await until(lambda: (b"bad", 2) in calls, within=10)  # left to the ack wait, then redelivered
    assert (b"good", 1) in calls and loop.running

    async def settled() -> bool:
        return await rig.unsettled() == 0

    await eventually(settled, within=5)


async def test_a_failing_idle_hook_does_not_end_the_loop(rig: Rig) -> None:
    quiet = 0

    async def failing() -> None:
        nonlocal quiet
        quiet += 1
        raise RuntimeError("database away")

    seen = Recorder()
    loop = await rig.loop(seen, idle=failing, fetch_timeout=0.3)
    await until(lambda: quiet >= 2)
    await rig.publish(b"after")
    await until(lambda: seen.payloads() == [b"after"])
    assert loop.running


async def test_stream_away_and_back_the_consumer_is_declared_again(rig: Rig) -> None:
    seen = Recorder()
    loop = await rig.loop(seen)
    await rig.publish(b"before")
    await until(lambda: seen.payloads() == [b"before"])
    await rig.js.delete_stream(rig.stream)
    await until(lambda: loop.failures >= 3)  # backing off, trying to declare it again
    assert loop.running
    await rig.create_stream()
    await rig.publish(b"after")
    await until(lambda: seen.payloads() == [b"before", b"after"], within=15)
    assert loop.failures == 0


async def test_broker_away_and_back(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "store")
    server.start()
    nc = await _connected(server.url)
    try:
        rig = Rig(nc, nc.jetstream(timeout=2))
        await rig.create_stream()
        seen = Recorder()
        loop = await rig.loop(seen)
        await rig.publish(b"before")
        await until(lambda: seen.payloads() == [b"before"])
        server.stop()
        await asyncio.sleep(2.0)  # fetches time out or fail meanwhile
        assert loop.running
        server.start()  # the same port and store: the stream and the consumer are still there
        await until(lambda: nc.is_connected, within=15)
        await rig.publish(b"after")
        await until(lambda: seen.payloads() == [b"before", b"after"], within=15)
        assert loop.running
        await loop.stop()
    finally:
        await nc.close()
        server.stop()
