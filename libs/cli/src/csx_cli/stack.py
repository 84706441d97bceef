"""A whole local CSX stack: one nats-server (JetStream) and the four services, as child processes.

`csx up` (and so `make run`) uses this, and so do the end-to-end tests, so both start the same
five processes the same way:

    with Stack(StackConfig(data_dir=tmp, base_port=0, nats_port=0)) as stack:
        stack.addresses["referrals"]    # "127.0.0.1:50051"

Layout under the data directory (default ./var):

    nats/            JetStream store
    logs/<name>.log  each process's stdout and stderr (nats.log for the broker)
    <service>.db     each service's SQLite database
    keyring.json     the development keyring, shared by the four services (created here, before the
                     services start, so four first starts cannot race to write four different ones)
    pki/             development CA and certificates, token key, referrals' sealed-intake key pair
                     (intake/referrals.key, .pub), NATS users' passwords (nats/)

Ports: services on base_port..base_port+3 (referrals, panel, conferences, actionplans), NATS on
nats_port; 0 means "pick free ports" (tests). The system NATS on 4222 is never used.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from csx_cli.identity import probe_credentials
from csx_common.client import sync_channel
from csx_common.messaging.topology import topology
from csx_common.natsauth import INTAKE_RECEIVER, INTAKE_STREAM, Consumes, DevNatsAuth, declared_consumes
from csx_common.natsserver import nats_server_binary as _nats_server_binary
from csx_common.pki import AGENCIES, Credentials, DevPki, PeerIdentity

SERVICES: tuple[str, ...] = ("referrals", "panel", "conferences", "actionplans")
DEFAULT_BASE_PORT = 50051
DEFAULT_NATS_PORT = 14222
DEFAULT_HOST = "127.0.0.1"
# Streams (one per service, as its contract declares it, and agencies' sealed intake).
STREAMS: tuple[str, ...] = (*(topology().stream(s).name for s in SERVICES), INTAKE_STREAM)
# Who owns which durable consumer on which stream: also what each service's NATS user may read.
# Every event consumer is its contract's (csx.options.v1.topology on each gRPC service).
CONSUMES: tuple[Consumes, ...] = (
    *declared_consumes(),
    # Agencies' sealed concerns (csx_common.intake; docs/adr/0007): not an event consumer.
    Consumes(INTAKE_RECEIVER, INTAKE_STREAM, "referrals-intake"),
)
CONSUMERS: tuple[tuple[str, str], ...] = tuple((c.stream, c.durable) for c in CONSUMES)
RESERVED_PORTS = frozenset({4222})


def local_database_url(data_dir: Path, name: str) -> str:
    """Where `csx up` keeps service `name`'s SQLite database under `data_dir`."""
    return f"sqlite+aiosqlite:///{Path(data_dir).resolve() / f'{name}.db'}"


def local_audit_signing_key(data_dir: Path, name: str) -> Path:
    """The key that signs service `name`'s audit checkpoints under `data_dir` (its public half
    is the same path plus `.pub`)."""
    return Path(data_dir).resolve() / "pki" / "audit" / f"{name}.key"


class StackError(RuntimeError):
    """The stack could not start (or a process died); the message says which and why."""


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise StackError(f"{name} must be an integer, not {value!r}") from None


def default_addresses(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Where clients find the services: CSX_<NAME>_ADDRESS, else the `csx up` default ports."""
    env = os.environ if environ is None else environ
    base_raw = env.get("CSX_BASE_PORT", "").strip()
    base = int(base_raw) if base_raw.isdigit() else DEFAULT_BASE_PORT
    return {
        name: env.get(f"CSX_{name.upper()}_ADDRESS") or f"{DEFAULT_HOST}:{base + i}" for i, name in enumerate(SERVICES)
    }


def default_nats_url(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    if env.get("CSX_NATS_URL"):
        return env["CSX_NATS_URL"]
    port_raw = env.get("CSX_NATS_PORT", "").strip()
    port = int(port_raw) if port_raw.isdigit() else DEFAULT_NATS_PORT
    return f"nats://{DEFAULT_HOST}:{port}"


def nats_server_binary() -> str:
    try:
        return _nats_server_binary()
    except FileNotFoundError as exc:
        raise StackError(str(exc)) from None


def free_ports(count: int, host: str = DEFAULT_HOST) -> list[int]:
    """`count` distinct ports that are free now (all held open while choosing, so none repeats)."""
    held: list[socket.socket] = []
    try:
        while len(held) < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            if int(s.getsockname()[1]) in RESERVED_PORTS:
                s.close()
                continue
            held.append(s)
        return [int(s.getsockname()[1]) for s in held]
    finally:
        for s in held:
            s.close()


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.3)
        return s.connect_ex((host, port)) == 0


def tail(path: Path, lines: int = 20, start: int = 0) -> str:
    """The last `lines` lines of a log written since byte offset `start`."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
    except OSError:
        return "(no log)"
    text = data.decode("utf-8", "replace").rstrip("\n")
    return "\n".join(text.splitlines()[-lines:]) if text else "(log is empty)"


def health_status(address: str, credentials: Credentials, timeout: float = 1.0, service: str = "") -> str:
    """SERVING / NOT_SERVING / UNKNOWN / SERVICE_UNKNOWN, or UNREACHABLE when no answer comes."""
    with sync_channel(address, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            return "SERVICE_UNKNOWN" if code == grpc.StatusCode.NOT_FOUND else "UNREACHABLE"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM if the process that started it dies (even by SIGKILL)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class StackConfig:
    data_dir: Path = field(default_factory=lambda: Path("var"))
    # 0: pick free ports (tests); otherwise services listen on base_port + 0..3.
    base_port: int = DEFAULT_BASE_PORT
    nats_port: int = DEFAULT_NATS_PORT
    host: str = DEFAULT_HOST
    log_level: str = "INFO"
    # JSON-lines span file every service appends to ("" for none).
    trace_file: str = ""
    # Per-service database URL overrides (e.g. PostgreSQL); SQLite files under data_dir otherwise.
    database_urls: Mapping[str, str] = field(default_factory=dict)
    # Extra environment for every service (after the stack's own), e.g. CSX_PANEL_RELAY_POLL_SECONDS.
    env: Mapping[str, str] = field(default_factory=dict)
    # Seconds to wait for each service to report SERVING, and for NATS to listen.
    start_timeout: float = 60.0
    stop_timeout: float = 10.0
    # Linux: children die with this process even if it is SIGKILLed. Leave off when start() runs
    # on a worker thread (the signal follows the thread that forked).
    die_with_parent: bool = False
    services: tuple[str, ...] = SERVICES


@dataclass
class _Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    log_offset: int = 0
    _log: IO[bytes] | None = None


class Stack:
    """Start, watch and stop nats-server plus the four services."""

    def __init__(self, config: StackConfig | None = None, *, echo: Callable[[str], None] | None = None) -> None:
        self.config = config or StackConfig()
        self.data_dir = Path(self.config.data_dir).resolve()
        self.log_dir = self.data_dir / "logs"
        self.keyring_file = self.data_dir / "keyring.json"
        # Development CA, service and agency certificates, and the user-token signing key.
        self.pki = DevPki(self.data_dir / "pki")
        # NATS users with per-service and per-agency permissions; lives beside the certificates.
        self.nats_auth = DevNatsAuth(self.pki.root / "nats")
        self._echo = echo or (lambda _msg: None)
        host = self.config.host
        for name in self.config.services:
            if name not in SERVICES:
                raise StackError(f"unknown service {name!r} (known: {', '.join(SERVICES)})")
        picked = iter(free_ports(len(SERVICES) + 1, host))
        self.nats_port = self.config.nats_port or next(picked)
        if self.nats_port in RESERVED_PORTS:
            raise StackError(f"NATS port {self.nats_port} is reserved for the system NATS; pick another")
        self.ports: dict[str, int] = {
            name: (self.config.base_port + i if self.config.base_port else next(picked))
            for i, name in enumerate(SERVICES)
        }
        self.nats_url = f"nats://{host}:{self.nats_port}"
        self.addresses: dict[str, str] = {name: f"{host}:{port}" for name, port in self.ports.items()}
        self._nats = _Proc(
            "nats",
            [
                nats_server_binary(),
                "-c",
                str(self.nats_auth.config_file),
                "-js",
                "-a",
                host,
                "-p",
                str(self.nats_port),
                "-sd",
                str(self.data_dir / "nats"),
                "-n",
                f"csx-dev-{self.nats_port}",
            ],
            dict(os.environ),
            self.log_dir / "nats.log",
        )
        self._services: dict[str, _Proc] = {
            name: _Proc(
                name,
                [sys.executable, "-m", f"csx_{name}"],
                self.service_env(name),
                self.log_dir / f"{name}.log",
            )
            for name in self.config.services
        }

    # -- configuration -------------------------------------------------------------------------

    def database_url(self, name: str) -> str:
        return self.config.database_urls.get(name) or local_database_url(self.data_dir, name)

    def audit_signing_key(self, name: str) -> Path:
        """Signs `name`'s audit checkpoints; `csx audit verify --public-key <this>.pub` checks them
        (and `csx audit verify --data-dir` finds them here)."""
        return local_audit_signing_key(self.data_dir, name)

    def service_env(self, name: str) -> dict[str, str]:
        """The environment a service process gets: ours (so CSX_<NAME>_* tuning passes through), with
        the stack's own settings for the service on top, then StackConfig.env."""
        prefix = f"CSX_{name.upper()}_"
        env = dict(os.environ)
        env.update(
            {
                f"{prefix}GRPC_ADDRESS": self.addresses[name],
                f"{prefix}DATABASE_URL": self.database_url(name),
                f"{prefix}NATS_URL": self.nats_url,
                f"{prefix}NATS_USER": name,
                f"{prefix}NATS_PASSWORD_FILE": str(self.nats_auth.password_file(name)),
                f"{prefix}KEYRING_FILE": str(self.keyring_file),
                f"{prefix}LOG_LEVEL": self.config.log_level,
                # Whatever the caller's shell says: the stack always runs with identities on.
                f"{prefix}INSECURE_DEV": "false",
                f"{prefix}TLS_CA_FILE": str(self.pki.ca_file),
                f"{prefix}TLS_CERT_FILE": str(self.pki.cert_file(PeerIdentity("service", name))),
                f"{prefix}TLS_KEY_FILE": str(self.pki.key_file(PeerIdentity("service", name))),
                f"{prefix}TOKEN_PUBLIC_KEY_FILE": str(self.pki.token_public_file),
                f"{prefix}AUDIT_SIGNING_KEY_FILE": str(self.audit_signing_key(name)),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.config.trace_file:
            env[f"{prefix}TRACE_FILE"] = str(Path(self.config.trace_file).resolve())
        if name == "actionplans":
            env["CSX_ACTIONPLANS_CONFERENCES_ADDRESS"] = self.addresses["conferences"]
        if name == "conferences":
            env["CSX_CONFERENCES_PANEL_ADDRESS"] = self.addresses["panel"]
        if name == "referrals":
            env["CSX_REFERRALS_INTAKE_KEY_FILE"] = str(self.pki.intake_key_file)
        env.update(self.config.env)
        return env

    @property
    def log_files(self) -> dict[str, Path]:
        return {"nats": self._nats.log_path, **{n: p.log_path for n, p in self._services.items()}}

    @property
    def pids(self) -> dict[str, int | None]:
        procs = {"nats": self._nats, **self._services}
        return {n: (p.popen.pid if p.popen and p.popen.poll() is None else None) for n, p in procs.items()}

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """NATS, then the four services; returns once every service's health check says SERVING.

        Raises StackError (after stopping whatever it started) naming the process that failed.
        """
        try:
            self._prepare()
            self.start_nats()
            for name in self._services:
                self._spawn(self._services[name])
            self.wait_serving(list(self._services))
        except BaseException:
            self.stop()
            raise

    def _prepare(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "nats").mkdir(parents=True, exist_ok=True)
        busy = [
            f"{label} port {port}"
            for label, port in [("NATS", self.nats_port), *((n, self.ports[n]) for n in self._services)]
            if port_in_use(self.config.host, port)
        ]
        if busy:
            raise StackError(
                "already in use: " + ", ".join(busy) + " (another `csx up`? choose others with "
                "--base-port/--nats-port or CSX_BASE_PORT/CSX_NATS_PORT)"
            )
        # Created once here: four services creating it on their first start would race.
        from csx_common.keyring import FileKeyring

        FileKeyring.load_or_create(self.keyring_file)
        self.pki.ensure()
        self.nats_auth.ensure(SERVICES, AGENCIES, CONSUMES)
        from csx_common.audit import AuditSigner

        for name in SERVICES:
            AuditSigner.load_or_create(self.audit_signing_key(name))

    def start_nats(self) -> None:
        self._spawn(self._nats)
        deadline = time.monotonic() + self.config.start_timeout
        while not port_in_use(self.config.host, self.nats_port):
            self._check_alive(self._nats)
            if time.monotonic() > deadline:
                raise StackError(self._failure(self._nats, f"not listening on port {self.nats_port}"))
            time.sleep(0.05)
        self._echo(f"nats listening on {self.nats_url} (JetStream store {self.data_dir / 'nats'})")

    def stop_nats(self, sig: int = signal.SIGTERM) -> None:
        self._terminate([self._nats], sig)

    def start_service(self, name: str, *, wait: bool = True, env: Mapping[str, str] | None = None) -> None:
        """Start one service; `env` adds to its environment for this run only (chaos failpoints)."""
        proc = self._services[name]
        proc.env = {**self.service_env(name), **(env or {})}
        self._spawn(proc)
        if wait:
            self.wait_serving([name])

    def process(self, name: str) -> subprocess.Popen[bytes] | None:
        """The running process of `name` ("nats" or a service), or None."""
        proc = self._nats if name == "nats" else self._services[name]
        return proc.popen if proc.popen is not None and proc.popen.poll() is None else None

    def stop_service(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Stop one service (SIGKILL for a crash); start_service() brings it back on the same port."""
        self._terminate([self._services[name]], sig)

    def stop(self) -> None:
        """Services first (SIGTERM, so they drain), then NATS. Safe to call twice."""
        self._terminate(list(self._services.values()), signal.SIGTERM)
        self._terminate([self._nats], signal.SIGTERM)

    def wait_serving(self, names: list[str], timeout: float | None = None) -> None:
        timeout = self.config.start_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        pending = list(names)
        last: dict[str, str] = {}
        while pending:
            for name in list(pending):
                proc = self._services[name]
                self._check_alive(proc)
                last[name] = health_status(self.addresses[name], probe_credentials(self.pki), timeout=0.5)
                if last[name] == "SERVING":
                    pending.remove(name)
                    self._echo(f"{name} SERVING on {self.addresses[name]}")
            if not pending:
                return
            if time.monotonic() > deadline:
                name = pending[0]
                raise StackError(
                    self._failure(
                        self._services[name],
                        f"not SERVING on {self.addresses[name]} after {timeout:.0f}s "
                        f"(health: {last.get(name, 'UNREACHABLE')}; also waiting for: "
                        f"{', '.join(pending[1:]) or 'nothing else'})",
                    )
                )
            time.sleep(0.2)

    def check(self) -> None:
        """Raise StackError if any process started here has exited."""
        for proc in [self._nats, *self._services.values()]:
            if proc.popen is not None:
                self._check_alive(proc)

    # -- internals -----------------------------------------------------------------------------

    def _spawn(self, proc: _Proc) -> None:
        if proc.popen is not None and proc.popen.poll() is None:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        proc._log = open(proc.log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        proc._log.write(f"--- csx stack: starting {proc.name} at {time.strftime('%Y-%m-%dT%H:%M:%S')} ---\n".encode())
        proc._log.flush()
        proc.log_offset = proc._log.tell()
        proc.popen = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            proc.argv,
            env=proc.env,
            stdin=subprocess.DEVNULL,
            stdout=proc._log,
            stderr=subprocess.STDOUT,
            # Own session: a terminal's Ctrl-C reaches only us, and we stop services before NATS.
            start_new_session=True,
            preexec_fn=_die_with_parent if self.config.die_with_parent else None,
        )

    def _check_alive(self, proc: _Proc) -> None:
        assert proc.popen is not None
        code = proc.popen.poll()
        if code is not None:
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
            raise StackError(self._failure(proc, how))

    def _failure(self, proc: _Proc, what: str) -> str:
        return f"{proc.name} {what}. Last lines of {proc.log_path}:\n{tail(proc.log_path, 20, proc.log_offset)}"

    def _terminate(self, procs: list[_Proc], sig: int) -> None:
        running = [p for p in procs if p.popen is not None and p.popen.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                assert proc.popen is not None
                proc.popen.send_signal(sig)
        deadline = time.monotonic() + self.config.stop_timeout
        for proc in running:
            assert proc.popen is not None
            try:
                proc.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._echo(f"{proc.name} did not stop within {self.config.stop_timeout:.0f}s; killing it")
                proc.popen.kill()
                proc.popen.wait()
        for proc in procs:
            if proc.popen is not None and proc.popen.poll() is not None:
                if proc in running:
                    self._echo(f"{proc.name} stopped (status {proc.popen.returncode})")
                if proc._log is not None:
                    proc._log.close()
                    proc._log = None
