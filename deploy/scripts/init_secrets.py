"""Generate the secrets a CSX deployment needs: keyrings, passwords, certificates, the token key.

    .venv/bin/python deploy/scripts/init_secrets.py compose
        For docker-compose.yml: deploy/compose/secrets/ (keyrings/, pki/, nats/, postgres-password)
        and .env (the database passwords, which compose puts into each service's database URL).

    .venv/bin/python deploy/scripts/init_secrets.py kubernetes --namespace csx --release csx \\
        --database-host db.example.org --out ./csx-secrets
        For the Helm chart (secrets.create=false): secrets.yaml (each service's Secret with
        database-url and keyring.json, and referrals' also with the sealed-intake key intake-key.pem,
        its TLS Secret, the NATS users' Secret, the NATS server's TLS Secret, the identity
        ConfigMap), intake-public.pem (the intake key's public half, for the agencies' systems),
        postgres-roles.sql (roles and databases to create), and
        pki/ (a new CA, agency certificates and the token-signing key, which stay with you). Apply or
        seal secrets.yaml, then delete it. With --pki none, only the keyrings, passwords and SQL are
        made: certificates come from your CA (cert-manager) and the token key from your identity
        provider (docs/deploy.md).

The PKI follows csx_common.pki: each service's certificate names it as spiffe://csx/service/<name>
and serves as both server and client certificate; agencies get spiffe://csx/agency/<agency>; end-user
tokens are signed with an Ed25519 key whose public half the services verify with.

Never overwrites: a keyring that exists is kept, because a lost keyring makes every sealed field
unreadable and a new one cannot decrypt what the old one sealed. Compose secrets are written 0444
inside a 0700 directory: readable by the containers' user (uid 10001, through the bind mount) and
by no other user on the host; keys that no container needs (the CA's, the token issuer's, the
agencies') stay 0600.

Runs with the repository's virtualenv (it uses csx_common for the keyring format and the PKI).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import secrets
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from csx_common.keyring import FileKeyring
from csx_common.pki import CertificateAuthority, DevPki, PeerIdentity

SERVICES = ("referrals", "panel", "conferences", "actionplans")
NATS_USERS = (*SERVICES, "operator")
ROOT = Path(__file__).resolve().parents[2]
COMPOSE_SECRETS = ROOT / "deploy" / "compose" / "secrets"
COMPOSE_ENV = ROOT / ".env"
# Names the compose NATS server answers to: its service name on the compose network, and loopback
# for operators on the host (`csx status` against 127.0.0.1:4222).
COMPOSE_NATS_NAMES = ("nats", "localhost", "127.0.0.1")
CERT_DAYS = 397


def password() -> str:
    """URL-safe (a database password goes inside a URL) and long."""
    return secrets.token_hex(24)


def keyring_json() -> str:
    """A new keyring in the services' format (csx_common.keyring.FileKeyring): one primary KEK and
    the blind-index key. In production the KEK lives in a KMS instead (docs/keys.md)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "keyring.json"
        FileKeyring.create(path)
        return path.read_text()


def load_ca(cert_file: Path, key_file: Path) -> CertificateAuthority:
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey), "the CA key must be an EC key"
    return CertificateAuthority(key, x509.load_pem_x509_certificate(cert_file.read_bytes()))


def issue(
    ca: CertificateAuthority,
    names: Iterable[str],
    uri: str = "",
    days: int = CERT_DAYS,
) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for DNS names / IP addresses (and a SPIFFE URI), signed by the CA,
    valid for server and client use (NATS routes and CSX services are both)."""
    names = list(names)
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)] if uri else []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else uri)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _write_new(path: Path, data: bytes | str, created: list[Path], mode: int = 0o444) -> bool:
    """Write `path` unless it exists. True if written."""
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    os.chmod(path, mode)
    created.append(path)
    return True


def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, _, value = line.partition("=")
                values[key.strip()] = value.strip()
    return values


def compose_env_names() -> list[str]:
    """The variables docker-compose.yml interpolates from .env."""
    return [f"{s.upper()}_DB_PASSWORD" for s in SERVICES]


def init_compose(secrets_dir: Path = COMPOSE_SECRETS, env_file: Path = COMPOSE_ENV) -> list[Path]:
    """Create whatever docker-compose.yml needs and is missing; returns the files written.

    Layout (docker-compose.yml's `secrets:` names these paths):
        keyrings/<service>.json     field-encryption keyring, one per service
        pki/                        csx_common.pki.DevPki layout: ca.crt, services/<service>.crt|.key,
                                    agencys/<agency>.crt|.key, token-issuer.key|.pub, and
                                    nats/<user>.password (csx_common.natsauth.DevNatsAuth layout), so
                                    that CSX_PKI_DIR=deploy/compose/secrets/pki serves the csx CLI
        nats/server.crt|.key        the NATS server's TLS certificate
        postgres-password           the PostgreSQL superuser's
    """
    created: list[Path] = []
    secrets_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(secrets_dir, 0o700)
    for service in SERVICES:
        _write_new(secrets_dir / "keyrings" / f"{service}.json", keyring_json(), created)
    pki_root = secrets_dir / "pki"
    before = {p for p in pki_root.rglob("*") if p.is_file()} if pki_root.exists() else set()
    pki = DevPki(pki_root).ensure()
    created += sorted({p for p in pki_root.rglob("*") if p.is_file()} - before)
    # What the containers mount must be readable by uid 10001; the rest stays owner-only.
    for service in SERVICES:
        for path in (pki.cert_file(PeerIdentity("service", service)), pki.key_file(PeerIdentity("service", service))):
            os.chmod(path, 0o444)
    os.chmod(pki.ca_file, 0o444)
    os.chmod(pki.token_public_file, 0o444)
    # The sealed-intake key: only the referrals container mounts it (docker-compose.yml).
    os.chmod(pki.intake_key_file, 0o444)
    for user in NATS_USERS:
        _write_new(pki_root / "nats" / f"{user}.password", password(), created)
    nats_dir = secrets_dir / "nats"
    if not (nats_dir / "server.crt").exists():
        ca = load_ca(pki.ca_file, pki_root / "ca.key")
        cert, key = issue(ca, COMPOSE_NATS_NAMES)
        _write_new(nats_dir / "server.crt", cert, created)
        _write_new(nats_dir / "server.key", key, created)
    _write_new(secrets_dir / "postgres-password", password(), created)
    values = read_env_file(env_file)
    missing = [name for name in compose_env_names() if not values.get(name)]
    if missing:
        new_file = not env_file.exists() or env_file.stat().st_size == 0
        with open(env_file, "a") as f:
            if new_file:
                f.write("# Written by deploy/scripts/init_secrets.py for docker-compose.yml. Keep it secret.\n")
            for name in missing:
                f.write(f"{name}={password()}\n")
        os.chmod(env_file, 0o600)
        created.append(env_file)
    return created


def _secret(
    name: str, namespace: str, data: Mapping[str, str], labels: Mapping[str, str], kind: str = "Opaque"
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "type": kind,
        "stringData": dict(data),
    }


def fullname(release: str) -> str:
    """The chart's <fullname> for a release (no nameOverride): the release if it contains "csx"."""
    return release if "csx" in release else f"{release}-csx"


def kubernetes_objects(
    *,
    namespace: str,
    release: str,
    database_host: str,
    database_port: int = 5432,
    database_ssl: str = "verify-full",
    ca: CertificateAuthority | None = None,
    token_public_key: bytes = b"",
    cluster_domain: str = "cluster.local",
    nats_replicas: int = 3,
    intake_key_pem: bytes = b"",
) -> tuple[list[dict[str, Any]], str]:
    """The objects the chart reads (secrets.create=false) and the SQL creating roles and databases.
    Without `ca`, no certificates (and without `token_public_key`, no identity ConfigMap)."""
    name = fullname(release)
    labels = {"app.kubernetes.io/part-of": "csx", "app.kubernetes.io/instance": release}
    objects: list[dict[str, Any]] = []
    sql = [
        "-- Roles and databases for CSX, one per service (run as a PostgreSQL superuser).",
        "-- Each service's role owns its database. For a separate DDL role for the migration Jobs,",
        "-- add it here and set migrations.secretKey=migration-database-url.",
    ]
    for service in SERVICES:
        db_password = password()
        role = f"csx_{service}"
        url = f"postgresql+asyncpg://{role}:{db_password}@{database_host}:{database_port}/{role}?ssl={database_ssl}"
        data = {"database-url": url, "keyring.json": keyring_json()}
        if service == "referrals" and intake_key_pem:
            data["intake-key.pem"] = intake_key_pem.decode()  # sealed intake (chart value intake.enabled)
        objects.append(_secret(f"{name}-{service}", namespace, data, labels))
        sql += [
            f"CREATE ROLE {role} LOGIN PASSWORD '{db_password}';",
            f"CREATE DATABASE {role} OWNER {role};",
            f"REVOKE ALL ON DATABASE {role} FROM PUBLIC;",
        ]
    objects.append(_secret(f"{name}-nats-auth", namespace, {f"{u}-password": password() for u in NATS_USERS}, labels))
    if ca is not None:
        ca_pem = ca.cert.public_bytes(serialization.Encoding.PEM).decode()
        tls: dict[str, tuple[list[str], str]] = {}
        for service in SERVICES:
            host = f"{name}-{service}"
            tls[f"{host}-tls"] = (
                [host, f"{host}.{namespace}.svc", f"{host}.{namespace}.svc.{cluster_domain}", "localhost", "127.0.0.1"],
                PeerIdentity("service", service).uri,
            )
        nats = f"{name}-nats"
        tls[f"{nats}-tls"] = (
            [
                nats,
                f"{nats}.{namespace}.svc",
                f"{nats}.{namespace}.svc.{cluster_domain}",
                *(f"{nats}-{i}.{nats}-headless.{namespace}.svc.{cluster_domain}" for i in range(nats_replicas)),
                "localhost",
            ],
            "",
        )
        for secret_name, (names, uri) in tls.items():
            cert, key = issue(ca, names, uri=uri)
            objects.append(
                _secret(
                    secret_name,
                    namespace,
                    {"tls.crt": cert.decode(), "tls.key": key.decode(), "ca.crt": ca_pem},
                    labels,
                    "kubernetes.io/tls",
                )
            )
    if token_public_key:
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": f"{name}-identity", "namespace": namespace, "labels": labels},
                "data": {"token-public-key.pem": token_public_key.decode()},
            }
        )
    return objects, "\n".join(sql) + "\n"


def init_kubernetes(out: Path, *, pki: str = "generate", **kwargs: Any) -> list[Path]:
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    secrets_path, sql_path = out / "secrets.yaml", out / "postgres-roles.sql"
    if secrets_path.exists() or sql_path.exists():
        raise SystemExit(f"{out} already holds secrets.yaml or postgres-roles.sql; not overwriting")
    created: list[Path] = []
    # The sealed-intake key pair: the private half goes into the referrals Secret, the public half
    # (intake-public.pem) to the agencies' systems.
    intake = x25519.X25519PrivateKey.generate()
    if pki == "generate":
        # A new CA, agency certificates for trial clients and the token-signing key pair
        # (csx_common.pki.DevPki); the services' certificates are issued with this release's names.
        pki_root = out / "pki"
        before = {p for p in pki_root.rglob("*") if p.is_file()} if pki_root.exists() else set()
        dev = DevPki(pki_root).ensure()
        created += sorted({p for p in pki_root.rglob("*") if p.is_file()} - before)
        kwargs |= {
            "ca": load_ca(dev.ca_file, pki_root / "ca.key"),
            "token_public_key": dev.token_public_file.read_bytes(),
        }
        loaded = serialization.load_pem_private_key(dev.intake_key_file.read_bytes(), password=None)
        assert isinstance(loaded, x25519.X25519PrivateKey)
        intake = loaded
    kwargs["intake_key_pem"] = intake.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = intake.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(out / "intake-public.pem", public, created, mode=0o644)
    objects, sql = kubernetes_objects(**kwargs)
    for path, text in ((secrets_path, yaml.safe_dump_all(objects, sort_keys=False)), (sql_path, sql)):
        _write_new(path, text, created, mode=0o600)
    return created


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="target", required=True)
    compose = sub.add_parser("compose", help="secrets for docker-compose.yml")
    compose.add_argument("--secrets-dir", type=Path, default=COMPOSE_SECRETS)
    compose.add_argument("--env-file", type=Path, default=COMPOSE_ENV)
    k8s = sub.add_parser("kubernetes", help="Secrets for the Helm chart (secrets.create=false)")
    k8s.add_argument("--namespace", required=True)
    k8s.add_argument("--release", required=True)
    k8s.add_argument("--database-host", required=True)
    k8s.add_argument("--database-port", type=int, default=5432)
    k8s.add_argument("--database-ssl", default="verify-full", choices=["verify-full", "verify-ca", "require"])
    k8s.add_argument("--cluster-domain", default="cluster.local")
    k8s.add_argument("--nats-replicas", type=int, default=3)
    k8s.add_argument(
        "--pki",
        choices=["generate", "none"],
        default="generate",
        help="generate: a new CA, certificates and token key (trial clusters); none: bring your own",
    )
    k8s.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.target == "compose":
        created = init_compose(args.secrets_dir, args.env_file)
    else:
        created = init_kubernetes(
            args.out,
            pki=args.pki,
            namespace=args.namespace,
            release=args.release,
            database_host=args.database_host,
            database_port=args.database_port,
            database_ssl=args.database_ssl,
            cluster_domain=args.cluster_domain,
            nats_replicas=args.nats_replicas,
        )
    for path in created:
        print(f"wrote {path}")
    if not created:
        print("nothing to do: every secret already exists (none was replaced)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
