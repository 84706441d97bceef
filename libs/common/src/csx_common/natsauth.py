"""NATS users and what each may do: one user per service and per partner agency, each allowed only
its own subjects (DESIGN.md §4). Rendered as a nats-server `authorization` block.

- A service publishes its own events (`csx.<service>.>`), manages only its own stream, and reads
  only the durable consumers it owns on other services' streams (create, info, next, ack).
- A partner agency publishes only its own intake subject (`csx.intake.<agency>`) and reads only its
  own partner subjects: `csx.<service>.partner.<agency>.>`, which each service publishes, through
  the disclosure policy, for that agency alone.
- The operator (`csx status`) may read stream and consumer information, nothing else.
Everyone receives replies (JetStream acknowledgements, pulled messages) only on its own inbox prefix,
`_INBOX_<user>.>` (`inbox_prefix(user)`; clients must connect with it): a shared `_INBOX.>` would let
any user read the messages every other user pulls.

Development passwords are random and written beside the config (0600); production uses the same
permission model with nkeys or TLS client identities (docs/deploy.md).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path


def inbox_prefix(user: str) -> str:
    """The reply-subject prefix a NATS user must connect with (nats-py `inbox_prefix`)."""
    return "_INBOX_" + "".join(c if c.isalnum() else "_" for c in user)


API = "$JS.API"


@dataclass(frozen=True)
class Consumes:
    """`service` owns durable `durable` on `stream`."""

    service: str
    stream: str
    durable: str


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def service_permissions(service: str, consumes: Iterable[Consumes]) -> Permissions:
    stream = f"CSX_{service.upper()}"
    publish = [
        f"csx.{service}.>",
        f"{API}.INFO",
        f"{API}.STREAM.CREATE.{stream}",
        f"{API}.STREAM.UPDATE.{stream}",
        f"{API}.STREAM.INFO.{stream}",
    ]
    for c in consumes:
        if c.service != service:
            continue
        publish += [
            f"{API}.CONSUMER.CREATE.{c.stream}.{c.durable}",
            f"{API}.CONSUMER.CREATE.{c.stream}.{c.durable}.>",
            f"{API}.CONSUMER.DURABLE.CREATE.{c.stream}.{c.durable}",
            f"{API}.CONSUMER.INFO.{c.stream}.{c.durable}",
            f"{API}.CONSUMER.MSG.NEXT.{c.stream}.{c.durable}",
            f"$JS.ACK.{c.stream}.{c.durable}.>",
        ]
    return Permissions(tuple(publish), (inbox_prefix(service) + ".>",))


def agency_permissions(agency: str) -> Permissions:
    return Permissions(
        (f"csx.intake.{agency}",), (f"csx.*.partner.{agency}.>", inbox_prefix(f"agency-{agency}") + ".>")
    )


def operator_permissions() -> Permissions:
    return Permissions(
        (f"{API}.INFO", f"{API}.STREAM.INFO.*", f"{API}.STREAM.NAMES", f"{API}.CONSUMER.INFO.*.*"),
        (inbox_prefix("operator") + ".>",),
    )


@dataclass(frozen=True)
class NatsUser:
    name: str
    password: str
    permissions: Permissions


def render_authorization(users: Sequence[NatsUser]) -> str:
    """The `authorization { users: [...] }` block (JSON values are valid NATS config values)."""
    rows = []
    for user in users:
        perms = {
            "publish": {"allow": list(user.permissions.publish)},
            "subscribe": {"allow": list(user.permissions.subscribe)},
        }
        rows.append(
            f"    {{user: {json.dumps(user.name)}, password: {json.dumps(user.password)}, "
            f"permissions: {json.dumps(perms)}}}"
        )
    return "authorization {\n  users: [\n" + ",\n".join(rows) + "\n  ]\n}\n"


class DevNatsAuth:
    """Users, passwords and nats.conf for a development stack, generated once under `root`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def password_file(self, user: str) -> Path:
        return self.root / f"{user}.password"

    @property
    def config_file(self) -> Path:
        return self.root / "authorization.conf"

    def ensure(self, services: Sequence[str], agencies: Sequence[str], consumes: Sequence[Consumes]) -> DevNatsAuth:
        self.root.mkdir(parents=True, exist_ok=True)
        users = [NatsUser(s, self._password(s), service_permissions(s, consumes)) for s in services]
        users += [NatsUser(f"agency-{a}", self._password(f"agency-{a}"), agency_permissions(a)) for a in agencies]
        users.append(NatsUser("operator", self._password("operator"), operator_permissions()))
        self.config_file.write_text(render_authorization(users))
        os.chmod(self.config_file, 0o600)
        return self

    def _password(self, user: str) -> str:
        path = self.password_file(user)
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(24))
        return path.read_text().strip()
