"""Sealed intake, the receiving side (docs/adr/0007): verify an agency's envelope, open it, and run
the durable consumer that answers each one. Mechanism only: what an opened message means (a
concern) is the receiving service's `accept` callback.

An envelope is accepted for opening only if its certificate chains to the partnership CA and names
`spiffe://csx/agency/<agency>`, its signature verifies with that certificate's key, the agency is
the same in the certificate, the envelope and the subject it was published on, it was signed within
`max_age` before the broker stored it (and not more than `skew` after: a concern waiting in the
stream while referrals is down does not go stale), and it is sealed to one of our intake keys. Otherwise it
is rejected with a stable reason code and nothing of it is kept: the consumer acks it (the stream
is a work queue, so it is gone) and answers on the agency's result subject.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.x509 import verification
from google.protobuf.message import DecodeError
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import BadRequestError

from csx.intake.v1 import intake_pb2
from csx_client import envelope
from csx_client.subjects import AGENCY_PATTERN, SUBMIT_SUBJECTS, agency_of, result_subject
from csx_common.messaging.pull import PullLoop, processing, record_failure, retry_delay
from csx_common.natsauth import INTAKE_STREAM
from csx_common.pki import PeerIdentity

log = structlog.get_logger("csx.intake")

ACCEPTED = intake_pb2.INTAKE_STATUS_ACCEPTED
REJECTED = intake_pb2.INTAKE_STATUS_REJECTED
DAY = 24 * 3600.0


class IntakeRejected(Exception):
    """A message that will never be accepted as sent: answered with `reason`, never retried."""

    def __init__(self, reason: str, field_paths: Sequence[str] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field_paths = tuple(field_paths)


@dataclass(frozen=True)
class Opened:
    agency: str
    message_id: str
    signed_at: datetime
    plaintext: bytes


def load_intake_key(path: str | Path) -> x25519.X25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, x25519.X25519PrivateKey):
        raise TypeError("the intake key must be an X25519 private key (PEM)")
    return key


class EnvelopeOpener:
    def __init__(
        self,
        ca_pem: bytes,
        keys: Sequence[x25519.X25519PrivateKey],
        *,
        max_age: timedelta = timedelta(minutes=5),
        skew: timedelta = timedelta(minutes=1),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = verification.Store(x509.load_pem_x509_certificates(ca_pem))
        # Several keys: a new intake key is added before agencies move to it, the old one kept until
        # nothing sealed to it can still be fresh.
        self._keys = {envelope.key_id(k.public_key()): k for k in keys}
        self._max_age = max_age
        self._skew = skew
        self._clock = clock
        # Verified certificates (by digest) -> (agency, public key, not-after): a chain check per
        # message would cost more than the rest of opening it.
        self._verified: OrderedDict[bytes, tuple[str, object, datetime]] = OrderedDict()

    def open(self, data: bytes, subject_agency: str, received_at: datetime | None = None) -> Opened:
        """Verify and open; `received_at` is when the broker stored the message (default: now)."""
        at = received_at or self._clock()
        try:
            outer = intake_pb2.Envelope.FromString(data)
        except DecodeError:
            raise IntakeRejected("MALFORMED") from None
        if not (outer.sealed_concern and outer.signature and outer.certificate):
            raise IntakeRejected("MALFORMED")
        cert_agency, public_key = self._trusted(outer.certificate, at)
        try:
            envelope.verify(public_key, outer.signature, envelope.signing_input(outer.sealed_concern))
        except (InvalidSignature, TypeError):
            raise IntakeRejected("BAD_SIGNATURE") from None
        try:
            sealed = intake_pb2.SealedConcern.FromString(outer.sealed_concern)
        except DecodeError:
            raise IntakeRejected("MALFORMED") from None
        if (
            sealed.version != envelope.VERSION
            or not AGENCY_PATTERN.match(sealed.agency)
            or not envelope.MESSAGE_ID_PATTERN.match(sealed.message_id)
            or not sealed.HasField("signed_at")
            or not sealed.ciphertext
        ):
            raise IntakeRejected("MALFORMED")
        if not (cert_agency == sealed.agency == subject_agency):
            raise IntakeRejected("AGENCY_MISMATCH")
        try:
            signed_at = sealed.signed_at.ToDatetime(tzinfo=UTC)
        except (ValueError, OverflowError):
            raise IntakeRejected("MALFORMED") from None
        if not (at - self._max_age <= signed_at <= at + self._skew):
            raise IntakeRejected("STALE")
        key = self._keys.get(sealed.recipient_key_id)
        if key is None:
            raise IntakeRejected("SEALED_TO_UNKNOWN_KEY")
        try:
            plaintext = envelope.open_ciphertext(sealed, key)
        except InvalidTag:
            raise IntakeRejected("UNDECRYPTABLE") from None
        return Opened(sealed.agency, sealed.message_id, signed_at, plaintext)

    def _trusted(self, der: bytes, at: datetime) -> tuple[str, object]:
        """The agency a certificate names and its public key, if the partnership CA issued it and it
        was valid at `at`."""
        digest = hashlib.sha256(der).digest()
        cached = self._verified.get(digest)
        if cached is not None and at <= cached[2]:
            self._verified.move_to_end(digest)
            return cached[0], cached[1]
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            raise IntakeRejected("MALFORMED") from None
        try:
            verifier = verification.PolicyBuilder().store(self._store).time(at).build_client_verifier()
            verified = verifier.verify(cert, [])
        except (verification.VerificationError, ValueError):
            raise IntakeRejected("UNTRUSTED_CERTIFICATE") from None
        agencies = [
            peer.name
            for san in verified.subjects or ()
            if isinstance(san, x509.UniformResourceIdentifier)
            and (peer := PeerIdentity.from_uri(san.value)) is not None
            and peer.kind == "agency"
        ]
        if len(agencies) != 1:
            raise IntakeRejected("UNTRUSTED_CERTIFICATE")
        entry = (agencies[0], cert.public_key(), cert.not_valid_after_utc)
        self._verified[digest] = entry
        if len(self._verified) > 256:
            self._verified.popitem(last=False)
        return entry[0], entry[1]


@dataclass(frozen=True)
class Delivery:
    """Where an opened message sits in the stream: a redelivery of the same sequence is not a replay."""

    sequence: int
    redelivered: bool
    stored_at: datetime


# What the receiving service does with an opened message: the result to answer with (raise
# IntakeRejected to refuse it; any other exception means "try again later").
Accept = Callable[[Opened, Delivery], Awaitable[intake_pb2.IntakeResult]]


async def ensure_intake_stream(js: JetStreamContext, *, replicas: int = 1, max_age_days: int = 30) -> None:
    """The intake stream: a work queue (an acked envelope is deleted), file storage, on every
    agency's submit subject only (results are core NATS and never stored)."""
    config = js_api.StreamConfig(
        name=INTAKE_STREAM,
        subjects=[SUBMIT_SUBJECTS],
        storage=js_api.StorageType.FILE,
        retention=js_api.RetentionPolicy.WORK_QUEUE,
        num_replicas=replicas,
        max_age=max_age_days * DAY,
        # A publish retried after a lost acknowledgement (same Nats-Msg-Id) is stored once.
        duplicate_window=120.0,
        discard=js_api.DiscardPolicy.NEW,
    )
    try:
        await js.add_stream(config)
    except BadRequestError:
        await js.update_stream(config)


class IntakeConsumer:
    """Sealed envelopes on the pull loop (csx_common.messaging.pull), a batch's envelopes handled at
    once: open, accept, answer, ack. A message that cannot be handled now (database down) is nak'ed
    with backoff and stays, sealed, in the stream; it is never given up on."""

    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        opener: EnvelopeOpener,
        accept: Accept,
        *,
        durable: str,
        replicas: int = 1,
        max_age_days: int = 30,
        batch: int = 32,
        ack_wait: float = 30.0,
        backoff: Sequence[float] = (0.5, 1, 2, 5, 10, 30),
    ) -> None:
        self._nc = nc
        self._opener = opener
        self._accept = accept
        self.durable = durable
        self._backoff = tuple(backoff)
        self._loop = PullLoop(
            js,
            stream=INTAKE_STREAM,
            durable=durable,
            subjects=[SUBMIT_SUBJECTS],
            handle=self.handle,
            ack_wait=ack_wait,
            batch=batch,
            concurrent=True,
            # This consumer owns its stream: declared with it, and again if it goes away.
            before_declare=partial(ensure_intake_stream, js, replicas=replicas, max_age_days=max_age_days),
        )
        self.accepted = 0
        self.rejected = 0

    async def declare(self) -> None:
        await self._loop.declare()

    async def start(self) -> None:
        await self.declare()
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    def _open(self, data: bytes, agency: str, delivery: Delivery) -> Opened:
        try:
            return self._opener.open(data, agency, delivery.stored_at)
        except IntakeRejected:
            raise
        except Exception as exc:
            # Opening does no I/O: an unexpected error would recur on every delivery, so never retry it.
            log.warning("intake_unreadable", sequence=delivery.sequence, error=type(exc).__name__)
            raise IntakeRejected("MALFORMED") from None

    async def handle(self, msg: Msg) -> None:
        meta = msg.metadata
        delivery = Delivery(meta.sequence.stream, (meta.num_delivered or 1) > 1, meta.timestamp)
        subject_agency = agency_of(msg.subject)
        with processing("csx.intake.submit process", msg, self.durable, parent=None) as span:
            span.set_attribute("csx.intake.sequence", delivery.sequence)
            result = intake_pb2.IntakeResult(stream_sequence=delivery.sequence)
            try:
                if subject_agency is None:
                    raise IntakeRejected("MALFORMED")
                opened = self._open(msg.data, subject_agency, delivery)
                result.message_id = opened.message_id
                span.set_attribute("messaging.message.id", opened.message_id)
                answer = await self._accept(opened, delivery)
                result.MergeFrom(answer)
            except IntakeRejected as exc:
                result.status = REJECTED
                result.reason = exc.reason
                result.field_paths[:] = exc.field_paths
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Kept in the stream; retried.
                record_failure(span, exc)
                log.warning("intake_failed", sequence=delivery.sequence, error=type(exc).__name__)
                with contextlib.suppress(Exception):
                    await msg.nak(delay=retry_delay(self._backoff, meta.num_delivered or 1))
                return
            span.set_attribute("csx.intake.status", intake_pb2.IntakeStatus.Name(result.status))
            if result.status == REJECTED:
                self.rejected += 1
                span.set_attribute("csx.intake.reason", result.reason)
                log.warning("intake_rejected", agency=subject_agency, sequence=delivery.sequence, reason=result.reason)
            else:
                self.accepted += 1
                log.info(
                    "intake_accepted",
                    agency=subject_agency,
                    sequence=delivery.sequence,
                    concern_id=result.response.concern_id,
                )
            # Answer first, then ack: a crash in between redelivers, and the answer is given again.
            if subject_agency is not None:
                with contextlib.suppress(Exception):
                    await self._nc.publish(result_subject(subject_agency), result.SerializeToString())
            with contextlib.suppress(Exception):
                await msg.ack()
