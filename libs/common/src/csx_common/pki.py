"""Development identities: a private CA, a certificate per service and per partner agency, the key
that signs end-user tokens, and the referrals service's sealed-intake key pair (X25519; agencies
seal concerns to its public half) — all generated on first run under one folder (./var/pki).

Who a peer is comes from its certificate's URI subject alternative name:
    spiffe://csx/service/<name>     a CSX service (referrals, panel, ...)
    spiffe://csx/agency/<agency>    a partner agency's system (police, health, ...)
Production issues the same shapes from the partnership's own CA (docs/deploy.md); nothing here
is special to development except that the CA key sits on disk beside the certificates.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SPIFFE_PREFIX = "spiffe://csx/"
SERVICES = ("referrals", "panel", "conferences", "actionplans")
# Agencies that get development client certificates (names as in csx.types.v1.Agency, lower case).
AGENCIES = (
    "police",
    "health",
    "education",
    "social_care",
    "youth_justice",
    "community_safety",
    "safeguarding_partnership",
)
CERT_DAYS = 397


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    kind: str  # "service" or "agency"
    name: str

    @property
    def uri(self) -> str:
        return f"{SPIFFE_PREFIX}{self.kind}/{self.name}"

    @classmethod
    def from_uri(cls, uri: str) -> PeerIdentity | None:
        if not uri.startswith(SPIFFE_PREFIX):
            return None
        kind, _, name = uri.removeprefix(SPIFFE_PREFIX).partition("/")
        if kind not in ("service", "agency") or not name or "/" in name:
            return None
        return cls(kind, name)


def peer_from_pem(pem: bytes) -> PeerIdentity | None:
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        peer = PeerIdentity.from_uri(uri)
        if peer is not None:
            return peer
    return None


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


def _key_pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | x25519.X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class CertificateAuthority:
    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.key = key
        self.cert = cert

    @classmethod
    def generate(cls, name: str = "CSX development CA") -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def issue(self, peer: PeerIdentity) -> tuple[bytes, bytes]:
        """(certificate PEM, private key PEM) for a peer; valid as both TLS server and client."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(peer.uri)]
        if peer.kind == "service":
            names += [
                x509.DNSName("localhost"),
                x509.DNSName(peer.name),
                x509.DNSName(f"csx-{peer.name}"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{peer.kind}:{peer.name}")]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


@dataclass(frozen=True)
class Credentials:
    """What one peer needs for mutual TLS: the CA to trust, its certificate and its key (PEM)."""

    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def load(cls, ca_file: str | Path, cert_file: str | Path, key_file: str | Path) -> Credentials:
        return cls(Path(ca_file).read_bytes(), Path(cert_file).read_bytes(), Path(key_file).read_bytes())


class DevPki:
    """The development PKI folder: ca.crt/ca.key, <kind>/<name>.crt/.key, token-issuer.key/.pub,
    intake/referrals.key/.pub."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def cert_file(self, peer: PeerIdentity) -> Path:
        return self.root / f"{peer.kind}s" / f"{peer.name}.crt"

    def key_file(self, peer: PeerIdentity) -> Path:
        return self.root / f"{peer.kind}s" / f"{peer.name}.key"

    @property
    def ca_file(self) -> Path:
        return self.root / "ca.crt"

    @property
    def token_key_file(self) -> Path:
        return self.root / "token-issuer.key"

    @property
    def token_public_file(self) -> Path:
        return self.root / "token-issuer.pub"

    @property
    def intake_key_file(self) -> Path:
        """The referrals service's sealed-intake private key (X25519, PEM): referrals only."""
        return self.root / "intake" / "referrals.key"

    @property
    def intake_public_file(self) -> Path:
        """Its public half, which agencies seal concerns to."""
        return self.root / "intake" / "referrals.pub"

    def ensure(self) -> DevPki:
        """Create whatever is missing (idempotent; an existing CA is kept)."""
        ca_key_file = self.root / "ca.key"
        if self.ca_file.exists() and ca_key_file.exists():
            ca = CertificateAuthority(
                serialization.load_pem_private_key(ca_key_file.read_bytes(), None),  # type: ignore[arg-type]
                x509.load_pem_x509_certificate(self.ca_file.read_bytes()),
            )
        else:
            ca = CertificateAuthority.generate()
            _write(ca_key_file, _key_pem(ca.key), private=True)
            _write(self.ca_file, ca.cert.public_bytes(serialization.Encoding.PEM))
        peers = [PeerIdentity("service", s) for s in SERVICES] + [PeerIdentity("agency", a) for a in AGENCIES]
        for peer in peers:
            if not (self.cert_file(peer).exists() and self.key_file(peer).exists()):
                self.issue_to_files(ca, peer)
        if not self.token_key_file.exists():
            key = ed25519.Ed25519PrivateKey.generate()
            _write(self.token_key_file, _key_pem(key), private=True)
            _write(
                self.token_public_file,
                key.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                ),
            )
        if not self.intake_key_file.exists():
            intake = x25519.X25519PrivateKey.generate()
            _write(self.intake_key_file, _key_pem(intake), private=True)
            _write(
                self.intake_public_file,
                intake.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                ),
            )
        return self

    def issue_to_files(self, ca: CertificateAuthority, peer: PeerIdentity) -> None:
        cert, key = ca.issue(peer)
        _write(self.key_file(peer), key, private=True)
        _write(self.cert_file(peer), cert)

    def credentials(self, peer: PeerIdentity) -> Credentials:
        return Credentials.load(self.ca_file, self.cert_file(peer), self.key_file(peer))
