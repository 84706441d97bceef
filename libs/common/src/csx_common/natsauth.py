"""NATS users and what each may do: one user per service and per partner agency, each allowed only
its own subjects (docs/security.md). Rendered as a nats-server `authorization` block.

- A service publishes its own events (its stream's subjects, `csx.<service>.>`), manages only its
  own stream, and reads only the durable consumers it owns on other services' streams (create, info,
  next, ack). Streams, subjects and durables are the contracts' (csx_common.messaging.topology).
- A partner agency publishes only its own sealed intake subject (`csx.intake.<agency>.submit`),
  hears back only on its own `csx.intake.<agency>.result`, and reads only its own partner subjects:
  `csx.<service>.partner.<agency>.>`, which each service publishes, through the disclosure policy,
  for that agency alone.
- The intake receiver (referrals) also owns the intake stream (`CSX_INTAKE` on
  `csx.intake.*.submit`) and answers on every agency's result subject (docs/adr/0007).
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

# Subject names and inbox prefixes are shared with the agencies' client library (one definition);
# inbox_prefix is also this module's (every CSX client connects with its user's).
from csx_client.subjects import RESULT_SUBJECTS, agency_user, result_subject, submit_subject
from csx_client.subjects import inbox_prefix as inbox_prefix
from csx_common.messaging.topology import topology

API = "$JS.API"
INTAKE_STREAM = "CSX_INTAKE"
# The service that receives sealed intake (owns INTAKE_STREAM and publishes the results).
INTAKE_RECEIVER = "referrals"


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


def declared_consumes() -> tuple[Consumes, ...]:
    """Every durable consumer the contracts declare (csx_common.messaging.topology), with its owner
    and stream. (Sealed intake's is not an event consumer: INTAKE_RECEIVER's, on INTAKE_STREAM.)"""
    return tuple(Consumes(d.service, d.stream, d.name) for d in topology().durables)


def service_permissions(service: str, consumes: Iterable[Consumes]) -> Permissions:
    """What `service` may do: publish on its stream's subjects and manage that stream, as its
    contract declares them, and read the durables it owns among `consumes`."""
    stream = topology().stream(service)
    publish = [
        *stream.subjects,
        f"{API}.INFO",
        f"{API}.STREAM.CREATE.{stream.name}",
        f"{API}.STREAM.UPDATE.{stream.name}",
        f"{API}.STREAM.INFO.{stream.name}",
    ]
    if service == INTAKE_RECEIVER:
        publish += [
            RESULT_SUBJECTS,
            f"{API}.STREAM.CREATE.{INTAKE_STREAM}",
            f"{API}.STREAM.UPDATE.{INTAKE_STREAM}",
            f"{API}.STREAM.INFO.{INTAKE_STREAM}",
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
    # Publishing to a stream needs no JetStream API right: the store's acknowledgement comes back
    # on the agency's own inbox.
    return Permissions(
        (submit_subject(agency),),
        (f"csx.*.partner.{agency}.>", result_subject(agency), inbox_prefix(agency_user(agency)) + ".>"),
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

    def ensure(
        self,
        services: Sequence[str],
        agencies: Sequence[str],
        consumes: Sequence[Consumes],
        extra: Sequence[NatsUser] = (),
    ) -> DevNatsAuth:
        """Write the configuration: the services, agencies and operator, plus `extra` users (tests)."""
        self.root.mkdir(parents=True, exist_ok=True)
        users = [NatsUser(s, self._password(s), service_permissions(s, consumes)) for s in services]
        users += [NatsUser(agency_user(a), self._password(agency_user(a)), agency_permissions(a)) for a in agencies]
        users.append(NatsUser("operator", self._password("operator"), operator_permissions()))
        users += extra
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
