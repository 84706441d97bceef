"""A service process, assembled from its settings: the one composition root every service uses.

Start order: logs and tracing -> database + migrations -> NATS + stream -> relay -> consumers ->
gRPC listening (NOT_SERVING) -> SERVING once all of that is ready. SIGTERM/SIGINT: NOT_SERVING,
gRPC graceful stop, consumers and relay stopped, NATS drained, engine disposed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import structlog
from google.protobuf import message as pb_message
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from sqlalchemy import MetaData

from csx_common import failpoints, logs, telemetry
from csx_common.audit import AuditLog, AuditSigner, AuditTables, run_checkpoints
from csx_common.datakeys import DataKeys
from csx_common.db import Database, Tx
from csx_common.grpc_server import Admits, GrpcServer
from csx_common.idempotency import IdempotencyKeys
from csx_common.identity import TokenVerifier
from csx_common.keyring import FileKeyring
from csx_common.messaging.consumer import ConsumerSpec, InboxConsumer
from csx_common.messaging.outbox import Handoff, Outbox
from csx_common.messaging.relay import Relay
from csx_common.messaging.streams import connect, ensure_stream
from csx_common.messaging.tables import DeliveryTables
from csx_common.messaging.topology import topology
from csx_common.migrations import upgrade
from csx_common.pki import Credentials
from csx_common.sealing import Sealer
from csx_common.sensitivity import registry
from csx_common.settings import ServiceSettings
from csx_common.unit_of_work import UnitsOfWork

log = structlog.get_logger("csx.runtime")


class ServiceRuntime:
    def __init__(
        self,
        service: str,
        settings: ServiceSettings,
        *,
        metadata: MetaData,
        delivery: DeliveryTables,
        migrations: Path,
        service_calls: Mapping[str, frozenset[str]] | None = None,
        admits: Admits | None = None,
    ) -> None:
        self.service = service
        self.settings = settings
        failpoints.arm(settings.failpoints)
        self.metadata = metadata
        self.delivery = delivery
        self.migrations = migrations
        # The stream its contract declares (csx.options.v1.topology on its gRPC service).
        self.stream = topology().stream(service)
        self.db = Database(settings.database_url)
        self.keyring = FileKeyring.load_or_create(settings.keyring_file)
        if "data_keys" not in metadata.tables:
            raise ValueError(f"{service}: tables need a data_keys table (csx_common.datakeys.data_keys_table)")
        self.data_keys = DataKeys(metadata.tables["data_keys"], self.keyring, service)
        self.sealer = Sealer(self.data_keys, registry())
        # SQLite: committed rows go to the relay in memory (on PostgreSQL replicas share the table).
        self.handoff = Handoff() if self.db.is_sqlite else None
        self.outbox = Outbox(delivery, wake=self.notify_relay, handoff=self.handoff)
        idempotency = metadata.tables.get("idempotency_keys")
        # Every use case and every event handler of this process runs in a unit of work made here.
        self.units = UnitsOfWork(
            self.db,
            outbox=self.outbox,
            sealer=self.sealer,
            idempotency=(
                IdempotencyKeys(idempotency, self.keyring.blind_index_key, self.sealer)
                if idempotency is not None
                else None
            ),
        )
        password_file = settings.nats_password_file
        self._nats_password = Path(password_file).read_text().strip() if password_file else ""
        self.nc: NATS | None = None
        self.js: JetStreamContext | None = None
        self.relay: Relay | None = None
        self.consumers: list[InboxConsumer] = []
        self._consumer_specs: list[ConsumerSpec] = []
        # Consumers declared after start, in the background (add_consumer(..., in_background=True)).
        self._background_specs: list[ConsumerSpec] = []
        self._background_task: asyncio.Task[None] | None = None
        # This service's own certificate, for its server port and for calls it makes to others.
        self.credentials: Credentials | None = None
        verifier = None
        if not settings.insecure_dev:
            self.credentials = Credentials.load(settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file)
            verifier = TokenVerifier(Path(settings.token_public_key_file).read_bytes())
        self.grpc = GrpcServer(
            settings.grpc_address,
            max_concurrent_rpcs=settings.max_concurrent_rpcs,
            max_message_bytes=settings.max_message_bytes,
            default_deadline=settings.default_deadline_seconds,
            reflection_on=settings.reflection,
            credentials=self.credentials,
            verifier=verifier,
            health_address=settings.health_address,
            service_calls=service_calls,
            admits=admits,
        )
        self._closers: list[Callable[[], Any]] = []
        self._checkpointer: tuple[AuditLog, AuditSigner] | None = None
        self._checkpoint_stop = asyncio.Event()
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._periodic: list[tuple[str, float, Callable[[], Awaitable[object]]]] = []
        self._periodic_stop = asyncio.Event()
        self._periodic_tasks: list[asyncio.Task[None]] = []

    def add_grpc(self, register: Callable[[Any, Any], None], servicer: Any, full_name: str) -> None:
        self.grpc.add(register, servicer, full_name)

    def add_periodic(self, name: str, every_seconds: float, job: Callable[[], Awaitable[object]]) -> None:
        """Run `job` every `every_seconds` while the process serves (first soon after start). A job
        must be safe to run in several replicas at once (each change under its own version check
        or lock): this is a timer, not a lease."""
        self._periodic.append((name, every_seconds, job))

    def add_consumer(self, spec: ConsumerSpec, *, in_background: bool = False) -> None:
        """A durable consumer, declared at start (health stays NOT_SERVING until its stream exists).
        `in_background`: declared after start, whenever its stream exists, for a consumer the service
        must not wait for (referrals, the front door, follows conferences' stream, which may not exist
        yet); until then its work only lags, since a new durable starts at the stream's beginning."""
        (self._background_specs if in_background else self._consumer_specs).append(spec)

    async def obsolete(self, session: Tx, event: pb_message.Message, *, lock: bool) -> bool:
        """Whether an event has nothing left to act on, so its consumer skips it (none here: the
        safeguarding runtime knows about erased children)."""
        return False

    def audit_log(self, tables: AuditTables) -> AuditLog:
        """The service's audit chain; with a signing key configured, a checkpoint is signed every
        AUDIT_CHECKPOINT_SECONDS while the service runs (and once more at shutdown)."""
        audit = self.units.audit = AuditLog(tables)
        if self.settings.audit_signing_key_file:
            signer = AuditSigner.load(self.settings.audit_signing_key_file)
            self._checkpointer = (audit, signer)
        return audit

    def on_close(self, closer: Callable[[], Any]) -> None:
        self._closers.append(closer)

    def notify_relay(self) -> None:
        if self.relay:
            self.relay.notify()

    async def prepare(self) -> None:
        """Database migrated, NATS connected, stream declared, relay running."""
        await self.db.ping()
        await upgrade(self.db, self.migrations)
        self.nc = await connect(
            self.settings.nats_url, f"csx-{self.service}", user=self.settings.nats_user, password=self._nats_password
        )
        self.js = self.nc.jetstream()
        await ensure_stream(
            self.js,
            self.stream,
            replicas=self.settings.stream_replicas,
            max_age_days=self.settings.stream_max_age_days,
        )
        self.relay = Relay(
            self.db,
            self.delivery,
            self.js,
            poll_seconds=self.settings.relay_poll_seconds,
            handoff=self.handoff,
        )
        self.relay.start()

    async def _start_consumers(self, specs: list[ConsumerSpec]) -> None:
        """Declare each consumer, waiting as long as it takes for the upstream service to create its
        stream: start order does not matter (health stays NOT_SERVING meanwhile, unless these are
        the background ones)."""
        assert self.js is not None
        for spec in specs:
            spec = dataclasses.replace(spec, ack_wait=self.settings.consumer_ack_wait_seconds)
            consumer = InboxConsumer(self.units, self.delivery, self.js, spec, obsolete=self.obsolete)
            attempt = 0
            while True:
                try:
                    await consumer.declare()
                    break
                except Exception as exc:
                    if attempt % 20 == 0:
                        log.warning("waiting_for_stream", stream=spec.stream, error=type(exc).__name__)
                    attempt += 1
                    await asyncio.sleep(min(5.0, 0.25 * attempt))
            consumer.start()
            self.consumers.append(consumer)

    async def start(self) -> None:
        """Everything up; health SERVING only at the end, when the service can do its work."""
        await self.prepare()
        await self.grpc.start()
        await self._start_consumers(self._consumer_specs)
        if self._background_specs:
            self._background_task = asyncio.create_task(
                self._start_consumers(self._background_specs), name="background-consumers"
            )
            self._background_task.add_done_callback(_log_failure)
        if self._checkpointer is not None:
            audit, signer = self._checkpointer
            self._checkpoint_task = asyncio.create_task(
                run_checkpoints(
                    self.db.transaction,
                    audit,
                    signer,
                    every=self.settings.audit_checkpoint_seconds,
                    stop=self._checkpoint_stop,
                ),
                name="audit-checkpoints",
            )
        for name, every, job in self._periodic:
            self._periodic_tasks.append(
                asyncio.create_task(_every(name, every, job, self._periodic_stop), name=f"periodic-{name}")
            )
        await self.grpc.set_serving(True)
        log.info("serving", address=self.settings.grpc_address, port=self.grpc.port, stream=self.stream.name)

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
            await stop.wait()
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        """Stop in order; each step is bounded, so a stuck dependency cannot keep the process from
        exiting (committed work is safe either way: the database is the system of record)."""
        log.info("stopping")
        await _bounded("grpc", self.grpc.stop())
        if self._background_task is not None:  # still waiting for a stream: stop waiting first
            self._background_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):  # a failure was logged when it happened
                await _bounded("background consumers", self._background_task)
        for consumer in self.consumers:
            await _bounded(f"consumer {consumer.spec.durable}", consumer.stop())
        self._periodic_stop.set()
        for task in self._periodic_tasks:
            await _bounded(task.get_name(), task)
        if self.relay:
            await _bounded("relay", self.relay.stop())
        if self._checkpoint_task is not None:
            self._checkpoint_stop.set()
            await _bounded("audit checkpoints", self._final_checkpoint())
        for closer in self._closers:
            result = closer()
            if asyncio.iscoroutine(result):
                await _bounded("closer", result)
        if self.nc:
            await _bounded("nats drain", self.nc.drain())
        await _bounded("database", self.db.dispose())
        log.info("stopped")

    async def _final_checkpoint(self) -> None:
        assert self._checkpoint_task is not None and self._checkpointer is not None
        await self._checkpoint_task
        audit, signer = self._checkpointer
        async with self.db.transaction() as session:  # a last checkpoint covering everything written
            await audit.checkpoint(session, signer)


SHUTDOWN_STEP_SECONDS = 10.0


async def _every(name: str, every: float, job: Callable[[], Awaitable[object]], stop: asyncio.Event) -> None:
    delay = min(every, 1.0)  # the first run soon after start: a restart does not wait a whole period
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        if stop.is_set():
            return
        try:
            await job()
        except Exception as exc:  # the next period tries again; the error's text may hold values
            log.warning("periodic_job_failed", job=name, error=type(exc).__name__)
        delay = every


def _log_failure(task: asyncio.Task[None]) -> None:
    """A background task that failed says so when it fails (its type only), not at shutdown."""
    if not task.cancelled() and task.exception() is not None:
        log.error("background_task_failed", task=task.get_name(), error=type(task.exception()).__name__)


async def _bounded(step: str, work: Any) -> None:
    try:
        await asyncio.wait_for(work, SHUTDOWN_STEP_SECONDS)
    except TimeoutError:
        log.warning("shutdown_step_timed_out", step=step)
    except Exception as exc:
        log.warning("shutdown_step_failed", step=step, error=type(exc).__name__)


def setup_process(service: str, settings: ServiceSettings) -> None:
    logs.configure(service, settings.log_level)
    telemetry.configure(f"csx-{service}", settings.trace_file)
