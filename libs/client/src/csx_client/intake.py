"""An agency system's side of sealed intake: seal, sign, publish, and wait for referrals' answer.

    client = await IntakeClient.connect(url, identity, recipient, password=...)
    result = await client.submit(request)                # one concern, answered (or TimeoutError)
    futures = [await client.publish(r) for r in many]    # or many in flight, answered as they come
    results = await asyncio.gather(*futures)

Answers arrive on the agency's own result subject and are matched by stream sequence. A publish is
stored by JetStream before `publish` returns (its acknowledgement), so a concern is never lost once
published; if its answer is missed (a dropped connection), publishing the same agency reference
again answers with the first result.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import OrderedDict
from collections.abc import Iterable

import nats
from google.protobuf import message as pb_message
from google.protobuf.message import DecodeError
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from csx.intake.v1 import intake_pb2
from csx_client.envelope import AgencyIdentity, Recipient, seal
from csx_client.subjects import agency_user, inbox_prefix, result_subject, submit_subject

ACCEPTED = intake_pb2.INTAKE_STATUS_ACCEPTED
REJECTED = intake_pb2.INTAKE_STATUS_REJECTED
# Answers kept for publishes whose acknowledgement has not arrived yet (others' are dropped in turn).
EARLY_RESULTS = 1024


class IntakeClient:
    def __init__(
        self,
        nc: NATS,
        identity: AgencyIdentity,
        recipient: Recipient,
        *,
        publish_timeout: float = 5.0,
        owns_connection: bool = False,
    ) -> None:
        self.nc = nc
        self.identity = identity
        self.recipient = recipient
        self._js = nc.jetstream(timeout=publish_timeout)
        self._publish_timeout = publish_timeout
        self._owns = owns_connection
        # Answers are matched to publishes by stream sequence (every answer carries it, even for an
        # envelope referrals could not read). One that arrives before our acknowledgement waits here.
        self._waiting: dict[int, list[asyncio.Future[intake_pb2.IntakeResult]]] = {}
        self._early: OrderedDict[int, intake_pb2.IntakeResult] = OrderedDict()
        self._sub: Subscription | None = None

    @classmethod
    async def connect(
        cls,
        url: str,
        identity: AgencyIdentity,
        recipient: Recipient,
        *,
        password: str = "",
        user: str | None = None,
        tls: ssl.SSLContext | None = None,
        publish_timeout: float = 5.0,
    ) -> IntakeClient:
        """Connect as the agency's NATS user (`agency-<agency>`, replies under its own inbox prefix)."""
        user = user or agency_user(identity.agency)
        options: dict[str, object] = {"user": user, "password": password} if password else {}
        nc = await nats.connect(
            url,
            name=f"csx-intake-{identity.agency}",
            inbox_prefix=inbox_prefix(user),
            tls=tls,
            connect_timeout=5,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            **options,
        )
        client = cls(nc, identity, recipient, publish_timeout=publish_timeout, owns_connection=True)
        await client.start()
        return client

    async def start(self) -> None:
        """Listen for answers (before anything is published, so none is missed)."""
        if self._sub is None:
            self._sub = await self.nc.subscribe(result_subject(self.identity.agency), cb=self._on_result)
            await self.nc.flush()

    async def publish(self, request: pb_message.Message) -> asyncio.Future[intake_pb2.IntakeResult]:
        """Seal, sign and publish a SubmitConcernRequest; returns once JetStream has stored it, with a
        future that resolves to referrals' answer."""
        message_id, data = seal(request, self.identity, self.recipient)
        # Nats-Msg-Id: a publish retried after a lost acknowledgement is stored once.
        return await self.publish_sealed(data, msg_id=message_id)

    async def publish_sealed(
        self, data: bytes, *, msg_id: str | None = None
    ) -> asyncio.Future[intake_pb2.IntakeResult]:
        """Publish an already sealed envelope (bytes as they are) and return the future answer."""
        await self.start()
        ack = await self._js.publish(
            submit_subject(self.identity.agency),
            data,
            timeout=self._publish_timeout,
            headers={"Nats-Msg-Id": msg_id} if msg_id else None,
        )
        future: asyncio.Future[intake_pb2.IntakeResult] = asyncio.get_running_loop().create_future()
        early = self._early.pop(ack.seq, None)
        if early is not None:
            future.set_result(early)
            return future
        waiting = self._waiting.setdefault(ack.seq, [])
        waiting.append(future)

        def forget(f: asyncio.Future[intake_pb2.IntakeResult]) -> None:
            if f in waiting:
                waiting.remove(f)
            if not waiting:
                self._waiting.pop(ack.seq, None)

        future.add_done_callback(forget)
        return future

    async def submit(self, request: pb_message.Message, wait: float = 10.0) -> intake_pb2.IntakeResult:
        """Publish one concern and wait up to `wait` seconds for its answer (else TimeoutError)."""
        future = await self.publish(request)
        return await asyncio.wait_for(future, wait)

    async def submit_many(
        self, requests: Iterable[pb_message.Message], wait: float = 30.0
    ) -> list[intake_pb2.IntakeResult]:
        """Publish all, then wait up to `wait` seconds for every answer (bulk loads, benchmarks)."""
        futures = [await self.publish(r) for r in requests]
        return list(await asyncio.wait_for(asyncio.gather(*futures), wait))

    async def _on_result(self, msg: Msg) -> None:
        try:
            result = intake_pb2.IntakeResult.FromString(msg.data)
        except DecodeError:
            return
        waiting = self._waiting.get(result.stream_sequence)
        if not waiting:
            # Ours before its acknowledgement arrived, or another client's of the same agency.
            self._early[result.stream_sequence] = result
            while len(self._early) > EARLY_RESULTS:
                self._early.popitem(last=False)
            return
        for future in list(waiting):
            if not future.done():
                future.set_result(result)

    async def close(self) -> None:
        for waiting in list(self._waiting.values()):
            for future in list(waiting):
                future.cancel()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        if self._owns and not self.nc.is_closed:
            await self.nc.drain()
