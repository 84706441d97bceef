"""JetStream connection and stream declaration (idempotent: add, or update to the declared config)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import BadRequestError

from csx_common.messaging.events import StreamSpec
from csx_common.natsauth import inbox_prefix

DAY = 24 * 3600.0


async def connect(
    url: str,
    name: str,
    *,
    on_disconnect: Callable[[], Awaitable[None]] | None = None,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
    user: str = "",
    password: str = "",
) -> NATS:
    async def disconnected() -> None:
        if on_disconnect:
            await on_disconnect()

    async def reconnected() -> None:
        if on_reconnect:
            await on_reconnect()

    async def error(_exc: Exception) -> None:
        # Connection errors are expected while the broker is away; the outbox keeps the events.
        return None

    return await nats.connect(
        url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=2,
        allow_reconnect=True,
        disconnected_cb=disconnected,
        reconnected_cb=reconnected,
        error_cb=error,
        **({"user": user, "password": password, "inbox_prefix": inbox_prefix(user)} if user else {}),
    )


async def ensure_stream(js: JetStreamContext, spec: StreamSpec, *, replicas: int = 1, max_age_days: int = 30) -> None:
    config = js_api.StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        storage=js_api.StorageType.FILE,
        retention=js_api.RetentionPolicy.LIMITS,
        num_replicas=replicas,
        max_age=max_age_days * DAY,
        # Sized well beyond the relay's retry horizon, so republishing after a crash dedupes.
        duplicate_window=2 * 3600.0,
        discard=js_api.DiscardPolicy.OLD,
    )
    try:
        await js.add_stream(config)
    except BadRequestError:
        await js.update_stream(config)
