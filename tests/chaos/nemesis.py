"""Nemeses: the faults real deployments meet, each injected and healed on a running stack.

Each is an async function of the Faults context; `schedule()` mixes them at random from a seed,
every one at least once. They run on a worker thread where they block (process control), so the
workload keeps going on the event loop meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine.url import make_url

from csx_cli.stack import Stack
from csx_common.natsauth import inbox_prefix

SERVICES = ("referrals", "panel", "conferences", "actionplans")


@dataclass
class Injected:
    name: str
    started: float
    ended: float = 0.0
    note: str = ""


@dataclass
class Faults:
    stack: Stack
    ack_wait: float
    injected: list[Injected] = field(default_factory=list)

    async def record(self, name: str, fault: Callable[[], Awaitable[str | None]]) -> None:
        entry = Injected(name, time.monotonic())
        self.injected.append(entry)
        entry.note = (await fault()) or ""
        entry.ended = time.monotonic()

    async def blocking(self, fn: Callable[[], object]) -> None:
        await asyncio.to_thread(fn)

    # -- processes ------------------------------------------------------------------------------
    async def kill_nats(self) -> str:
        await self.blocking(lambda: self.stack.stop_nats(signal.SIGKILL))
        await asyncio.sleep(1.5)
        await self.blocking(self.stack.start_nats)
        return "SIGKILL nats-server, restarted after 1.5 s"

    async def kill_service(self, name: str) -> str:
        await self.blocking(lambda: self.stack.stop_service(name, signal.SIGKILL))
        await asyncio.sleep(0.5)
        await self.blocking(lambda: self.stack.start_service(name))
        return f"SIGKILL {name}, restarted"

    async def pause(self, name: str) -> str:
        """SIGSTOP longer than the ack wait: JetStream redelivers what the process was holding."""
        proc = self.stack.process(name)
        if proc is None:
            return f"{name} not running"
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(self.ack_wait + 1.0)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        return f"SIGSTOP {name} for {self.ack_wait + 1.0:.1f} s"

    async def crash_at(self, name: str, point: str) -> str:
        """Restart `name` with a failpoint armed; it dies there (exit 86) at the first chance; then
        it is restarted plainly. Points: relay.before_publish, relay.before_mark, consumer.before_ack."""
        await self.blocking(lambda: self.stack.stop_service(name, signal.SIGKILL))
        env = {f"CSX_{name.upper()}_FAILPOINTS": point}
        await self.blocking(lambda: self.stack.start_service(name, wait=False, env=env))
        deadline = time.monotonic() + 30
        died = False
        while time.monotonic() < deadline:
            if self.stack.process(name) is None:
                died = True
                break
            await asyncio.sleep(0.1)
        if not died:  # nothing reached the point in time (a quiet moment): stop it anyway
            await self.blocking(lambda: self.stack.stop_service(name, signal.SIGKILL))
        await self.blocking(lambda: self.stack.start_service(name))
        return f"{name} crashed at {point}" if died else f"{name} never reached {point} (killed instead)"

    # -- the database ---------------------------------------------------------------------------
    async def lock_database(self, name: str, seconds: float = 3.0) -> str:
        """Every writer of `name` blocked for a while (SQLite: an exclusive transaction; PostgreSQL:
        its outbox and inbox locked)."""
        url = make_url(self.stack.database_url(name))
        if url.get_backend_name() == "sqlite":

            def hold() -> None:  # on a thread: taking the lock may wait for a writer to finish
                conn = sqlite3.connect(str(url.database), timeout=30, isolation_level=None)
                try:
                    conn.execute("BEGIN EXCLUSIVE")
                    time.sleep(seconds)
                    conn.execute("ROLLBACK")
                finally:
                    conn.close()

            await self.blocking(hold)
        else:
            import asyncpg

            conn = await asyncpg.connect(url.set(drivername="postgresql").render_as_string(hide_password=False))
            try:
                # In the services' order (a consumer claims its inbox row, then writes its events),
                # and again if PostgreSQL still picks this transaction as a deadlock's victim.
                for attempt in range(5):
                    try:
                        async with conn.transaction():
                            await conn.execute("LOCK TABLE inbox, outbox IN ACCESS EXCLUSIVE MODE")
                            await asyncio.sleep(seconds)
                        break
                    except asyncpg.exceptions.DeadlockDetectedError:
                        if attempt == 4:
                            raise
            finally:
                await conn.close()
        return f"{name} database locked for {seconds:.0f} s"

    # -- the broker loses a message -------------------------------------------------------------
    async def chaos_user(self) -> tuple[str, str]:
        """A NATS user for this harness alone that may read and delete stream messages (no service
        may): the stack's users plus it. Called once before the load starts (it restarts NATS)."""
        from csx_cli.stack import AGENCIES, CONSUMES
        from csx_common.natsauth import NatsUser, Permissions

        auth = self.stack.nats_auth
        if "chaos-nemesis" not in auth.config_file.read_text():
            api = "$JS.API.STREAM"
            rights = Permissions(
                (f"{api}.INFO.CSX_REFERRALS", f"{api}.MSG.GET.CSX_REFERRALS", f"{api}.MSG.DELETE.CSX_REFERRALS"),
                (inbox_prefix("chaos-nemesis") + ".>",),
            )
            auth.ensure(
                SERVICES, AGENCIES, CONSUMES, extra=[NatsUser("chaos-nemesis", "chaos-nemesis-password", rights)]
            )
            # A restart, not SIGHUP: the server refuses to reload a configuration given a -n name.
            await self.blocking(self.stack.stop_nats)
            await self.blocking(self.stack.start_nats)
        return "chaos-nemesis", "chaos-nemesis-password"

    async def lose_message(self) -> str:
        """Delete a ConcernRecorded from the stream before the panel reads it: the broker lost an
        acknowledged message. Only reconciliation brings it back."""
        import nats

        panel = self.stack.process("panel")
        if panel is None:
            return "panel not running"
        user, password = await self.chaos_user()
        nc = await nats.connect(self.stack.nats_url, user=user, password=password, inbox_prefix=inbox_prefix(user))
        os.kill(panel.pid, signal.SIGSTOP)
        deleted = ""
        try:
            # A pull request the panel made just before the pause stays open for its 1 s fetch
            # timeout, and the server would hand it the next message (into the paused process's
            # socket): wait it out, so the message deleted below is one the panel never received.
            await asyncio.sleep(1.5)
            js = nc.jetstream()
            first = (await js.stream_info("CSX_REFERRALS")).state.last_seq
            deadline = time.monotonic() + 20
            while not deleted and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                last = (await js.stream_info("CSX_REFERRALS")).state.last_seq
                for seq in range(last, first, -1):
                    try:
                        msg = await js.get_msg("CSX_REFERRALS", seq)
                    except Exception:  # already gone
                        continue
                    if msg.subject == "csx.referrals.concern_recorded":
                        await js.delete_msg("CSX_REFERRALS", seq)
                        deleted = f"deleted CSX_REFERRALS #{seq} (event {(msg.headers or {}).get('Nats-Msg-Id')})"
                        break
        finally:
            os.kill(panel.pid, signal.SIGCONT)
            await nc.close()
        return deleted or "no new concern to lose"


def catalogue(faults: Faults) -> dict[str, Callable[[], Awaitable[str]]]:
    """Every nemesis by name."""
    out: dict[str, Callable[[], Awaitable[str]]] = {"kill-nats": faults.kill_nats}
    for name in SERVICES:
        out[f"kill-{name}"] = lambda n=name: faults.kill_service(n)  # type: ignore[misc]
    out["pause-panel"] = lambda: faults.pause("panel")
    out["pause-nats"] = lambda: faults.pause("nats")
    out["lock-referrals-db"] = lambda: faults.lock_database("referrals")
    out["lock-panel-db"] = lambda: faults.lock_database("panel")
    out["crash-referrals-relay-before-publish"] = lambda: faults.crash_at("referrals", "relay.before_publish")
    out["crash-referrals-relay-before-mark"] = lambda: faults.crash_at("referrals", "relay.before_mark")
    out["crash-panel-consumer-before-ack"] = lambda: faults.crash_at("panel", "consumer.before_ack")
    out["crash-conferences-consumer-before-ack"] = lambda: faults.crash_at("conferences", "consumer.before_ack")
    out["lose-message"] = faults.lose_message
    return out


def schedule(names: list[str], seed: int, *, rounds: int = 1, extra: int = 0) -> list[str]:
    """Every nemesis `rounds` times in a seeded random order, plus `extra` drawn at random."""
    rng = random.Random(seed)
    order = [n for _ in range(rounds) for n in names]
    rng.shuffle(order)
    order += [rng.choice(names) for _ in range(extra)]
    return order


async def unleash(faults: Faults, order: list[str], *, gap: float, stop: asyncio.Event | None = None) -> None:
    """Run the nemeses in order, `gap` seconds apart, until done (or `stop` is set)."""
    available = catalogue(faults)
    for name in order:
        if stop is not None and stop.is_set():
            return
        await faults.record(name, available[name])
        await asyncio.sleep(gap)


def sqlite_path(url: str) -> Path:
    return Path(str(make_url(url).database))


# Every nemesis's name (the catalogue's lambdas only touch `faults` when run).
NAMES: tuple[str, ...] = tuple(sorted(catalogue(Faults(None, 0.0))))  # type: ignore[arg-type]
