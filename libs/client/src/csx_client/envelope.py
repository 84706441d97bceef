"""The sealed-intake wire format (docs/adr/0007), in one place for both ends: agency systems seal
and sign here; referrals verifies and opens with the same functions (through csx_common.intake,
which adds the trust decisions: CA, agency, freshness, known keys).

    Envelope { sealed_concern: bytes(SealedConcern), signature, certificate }
    SealedConcern { version 1, agency, message_id, signed_at, recipient_key_id,
                    ciphertext = HPKE(X25519, HKDF-SHA256, AES-256-GCM) of SubmitConcernRequest }

The HPKE `info` binds agency, message id and recipient key id, so a ciphertext cannot be moved to
another envelope; the signature covers the whole SealedConcern, so nothing in it can be changed.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite
from google.protobuf import message as pb_message

from csx.intake.v1 import intake_pb2
from csx_client.subjects import AGENCY_PATTERN

VERSION = 1
SUITE = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM)
INFO_LABEL = b"csx-intake/v1"
SIGNATURE_LABEL = b"csx-intake/v1 signature"

MESSAGE_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{8,64}$")

SigningKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
VerifyingKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


def key_id(public_key: x25519.X25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()[:16].hex()


def hpke_info(agency: str, message_id: str, recipient_key_id: str) -> bytes:
    # Each part is a name or an id of [A-Za-z0-9_-] (checked on both ends): NUL separates unambiguously.
    return b"\x00".join((INFO_LABEL, agency.encode(), message_id.encode(), recipient_key_id.encode()))


def signing_input(sealed_concern: bytes) -> bytes:
    """What the agency signs: a label (its certificate's key is also its TLS key) and the exact bytes."""
    return SIGNATURE_LABEL + b"\x00" + sealed_concern


def sign(key: SigningKey, data: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    raise TypeError("the agency's key must be an EC or Ed25519 key")


def verify(public_key: object, signature: bytes, data: bytes) -> None:
    """Raises cryptography.exceptions.InvalidSignature (or TypeError for an unsupported key type)."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    elif isinstance(public_key, ed25519.Ed25519PublicKey):
        public_key.verify(signature, data)
    else:
        raise TypeError("unsupported signature key type")


def open_ciphertext(sealed: intake_pb2.SealedConcern, private_key: x25519.X25519PrivateKey) -> bytes:
    """The plaintext (a serialized SubmitConcernRequest). Raises cryptography.exceptions.InvalidTag
    when it was sealed to another key or for another agency, message id or key id."""
    return SUITE.decrypt(
        sealed.ciphertext, private_key, info=hpke_info(sealed.agency, sealed.message_id, sealed.recipient_key_id)
    )


@dataclass(frozen=True)
class AgencyIdentity:
    """Who signs: the agency's certificate from the partnership CA and its private key."""

    agency: str
    certificate_der: bytes
    key: SigningKey

    @classmethod
    def from_pem(cls, agency: str, cert_pem: bytes, key_pem: bytes) -> AgencyIdentity:
        if not AGENCY_PATTERN.match(agency):
            raise ValueError("agency must be a lower-case name such as 'police'")
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)):
            raise TypeError("the agency's key must be an EC or Ed25519 key")
        return cls(agency, cert.public_bytes(serialization.Encoding.DER), key)

    @classmethod
    def from_files(cls, agency: str, cert_file: str | Path, key_file: str | Path) -> AgencyIdentity:
        return cls.from_pem(agency, Path(cert_file).read_bytes(), Path(key_file).read_bytes())


@dataclass(frozen=True)
class Recipient:
    """The referrals service's intake public key (X25519), as the partnership distributes it."""

    public_key: x25519.X25519PublicKey

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    @classmethod
    def from_pem(cls, pem: bytes) -> Recipient:
        key = serialization.load_pem_public_key(pem)
        if not isinstance(key, x25519.X25519PublicKey):
            raise TypeError("the intake key must be an X25519 public key")
        return cls(key)

    @classmethod
    def from_file(cls, path: str | Path) -> Recipient:
        return cls.from_pem(Path(path).read_bytes())


def seal(
    request: pb_message.Message,
    identity: AgencyIdentity,
    recipient: Recipient,
    *,
    message_id: str | None = None,
    signed_at: datetime | None = None,
) -> tuple[str, bytes]:
    """(message id, serialized Envelope) for a csx.referrals.v1.SubmitConcernRequest."""
    message_id = message_id or str(uuid.uuid4())
    if not MESSAGE_ID_PATTERN.match(message_id):
        raise ValueError("a message id is 8 to 64 of A-Z, a-z, 0-9, _ and -")
    sealed = intake_pb2.SealedConcern(
        version=VERSION,
        agency=identity.agency,
        message_id=message_id,
        recipient_key_id=recipient.key_id,
    )
    sealed.signed_at.FromDatetime(signed_at or datetime.now(UTC))
    sealed.ciphertext = SUITE.encrypt(
        request.SerializeToString(),
        recipient.public_key,
        info=hpke_info(identity.agency, message_id, recipient.key_id),
    )
    body = sealed.SerializeToString()
    envelope = intake_pb2.Envelope(
        sealed_concern=body,
        signature=sign(identity.key, signing_input(body)),
        certificate=identity.certificate_der,
    )
    return message_id, envelope.SerializeToString()
