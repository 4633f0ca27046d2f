"""The TCC side of a soak run: three participants, each a real server
(:mod:`reliable_msg.harness.tcc_party`) behind a fault proxy of its own, and initiators
running the transactions of :mod:`soak.tcc_plan` beside the payments, under the same
faults.

The coordinator (the run's two service instances) calls each participant at its
proxy's URL (``[participants.<name>] url``, given by environment), and so do the
initiators' Trys: a stalled or cut proxy is the network to that participant failing.
The supervisor restarts a killed participant. The transactions run in this process
through the initiator SDK, except those whose initiator is killed between its Trys and
its commit: each runs in a process of its own (:mod:`soak.initiator`), killed with
SIGKILL once its Trys answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from demo.errors import DemoError
from demo.processes import Child, Supervisor, base_env
from reliable_msg.errors import Code, Conflict, ReliableMsgError, TryFailed, TryRefused
from reliable_msg.harness import tcc_party
from reliable_msg.harness.process import NotReady, wait_ready
from reliable_msg.harness.proxy import FaultProxy
from reliable_msg.sdk.tcc import Initiator

from .initiator import RETRY, TRIED, TRY_TIMEOUT, branches
from .options import Options
from .tcc_books import TccTally, read, tally, unfinished
from .tcc_plan import PARTICIPANTS, START, Ending, Transaction, make_tcc_plan

#: Ports the TCC side listens on: each participant and its proxy.
PORTS = 2 * len(PARTICIPANTS)
#: Transactions in flight at once.
CONCURRENCY = 8
#: Seconds from a transaction's begin to its deadline.
TIMEOUT = 60.0
#: The deadline of a transaction whose initiator is killed: the coordinator cancels it
#: this long after its begin.
KILLED_TIMEOUT = 10.0
#: Seconds a killed initiator's process gets to run its Trys.
KILLED_PATIENCE = 60.0
#: Initiators started for one planned kill, until one is killed after its Trys.
KILLED_ATTEMPTS = 5
#: Seconds between two looks at the coordinator's rows, waiting for quiescence.
QUIET_POLL = 0.5


class GaveUp(Exception):
    """The initiator's business decision after its Trys: cancel."""


@dataclass(frozen=True, slots=True)
class Party:
    """A participant as the run serves it: its own server and the proxy in front."""

    name: str
    port: int
    token: str
    proxy: FaultProxy

    @property
    def child(self) -> str:
        """Its process's name in the supervisor and its log's."""
        return f"tcc-{self.name}"

    @property
    def url(self) -> str:
        """Where the coordinator and the initiators call it: through its proxy."""
        return self.proxy.url("http", path=tcc_party.path(self.name))


class TccSide:
    """The participants, their proxies and the load; with ``--transactions 0`` none of
    them, and each method does nothing."""

    def __init__(
        self,
        options: Options,
        *,
        ports: Sequence[int],
        logs: Path,
        supervisor: Supervisor,
        event: Callable[[str], None],
        restarts: int,
    ) -> None:
        own, proxied = ports[: len(PARTICIPANTS)], ports[len(PARTICIPANTS) :]
        self.enabled = options.transactions > 0
        self.parties = [
            Party(name, port, secrets.token_urlsafe(24), FaultProxy("127.0.0.1", port, port=at))
            for name, port, at in zip(PARTICIPANTS, own, proxied, strict=True)
            if self.enabled
        ]
        self._o = options
        self._database_url = options.database_url
        self._service_database_url = options.service_database_url
        self._logs = logs
        self._supervisor = supervisor
        self._event = event
        self._restarts = restarts
        #: What each initiator saw, by gid: ``committed``, ``cancelled``, ``refused``,
        #: ``try-failed``, ``expired``, ``unknown`` (no definitive answer), ``killed``,
        #: or ``ended-before-kill``.
        self.outcomes: dict[str, str] = {}
        #: When the last transaction's initiator was done (monotonic).
        self.loaded_at: float | None = None
        self._load: asyncio.Task[None] | None = None
        self._payments = 0
        self._paying = asyncio.Event()

    def service_env(self) -> dict[str, str]:
        """The coordinator's ``[participants.<name>]``, by environment."""
        env = {}
        for p in self.parties:
            env[f"RMSG_PARTICIPANTS__{p.name.upper()}__URL"] = p.url
            env[f"RMSG_PARTICIPANTS__{p.name.upper()}__TOKEN"] = p.token
        return env

    @property
    def children(self) -> list[Child]:
        return [self._supervisor.children[p.child] for p in self.parties]

    @property
    def proxies(self) -> list[FaultProxy]:
        return [p.proxy for p in self.parties]

    async def open(self) -> None:
        for p in self.parties:
            await p.proxy.start()

    async def close(self) -> None:
        for p in self.parties:
            await p.proxy.close()

    async def reset(self) -> None:
        """Drop the participants' schemas (their accounts, runs and barriers)."""
        if not self.enabled:
            return
        conn = await asyncpg.connect(self._database_url)
        try:
            for p in self.parties:
                await tcc_party.drop(conn, p.name)
        finally:
            await conn.close()

    async def start(self, within: float) -> None:
        """Start the participants' servers; wait until each answers."""
        if not self.enabled:
            return
        for p in self.parties:
            argv = tcc_party.argv(p.name, p.port, self._database_url, start=START)
            env = {**base_env(), "RMSG_PARTY_TOKEN": p.token}
            log = self._logs / f"{p.child}.log"
            child = Child(p.child, argv, env, log, max_restarts=self._restarts, tier=0)
            self._supervisor.start(child)
        for p in self.parties:
            try:
                await wait_ready(f"http://127.0.0.1:{p.port}", within=within)
            except NotReady as exc:
                raise DemoError(f"{p.child}: {exc}") from exc
        names = ", ".join(f"{p.name} (proxy :{p.proxy.port})" for p in self.parties)
        self._event(f"TCC participants ready: {names}")

    # -- the load ------------------------------------------------------------------------

    def paying(self, started: int) -> None:
        """``started`` payments have been started: the transactions of moments up to it
        may start."""
        self._payments = started
        self._paying.set()

    def start_load(self, payments: int, service_url: str, token: str) -> None:
        """Plan the transactions over ``payments`` and start running them in the
        background (see :meth:`load`), as the producer of ``token``."""
        if not self.enabled:
            return
        o = self._o
        plan = make_tcc_plan(o.transactions, payments, crashes=o.crashes, seed=o.seed)
        endings = Counter(tx.ending for tx in plan)
        killed = ", ".join(tx.gid for tx in plan if tx.ending is Ending.KILLED) or "none"
        self._event(
            f"TCC: {len(plan)} transactions beside the payments ("
            + ", ".join(f"{n} {ending}" for ending, n in sorted(endings.items()))
            + f"); initiators killed between Try and commit: {killed}"
        )
        self._load = asyncio.create_task(self.load(plan, service_url, token))

    async def stop(self) -> None:
        """Stop the load if it still runs."""
        if self._load is not None and not self._load.done():
            self._load.cancel()
            await asyncio.gather(self._load, return_exceptions=True)

    async def load(self, plan: Sequence[Transaction], service_url: str, token: str) -> None:
        """Run every transaction of ``plan``, each once the payments started (see
        :meth:`paying`) have reached its moment, :data:`CONCURRENCY` at once."""
        limit = asyncio.Semaphore(CONCURRENCY)
        tasks: list[asyncio.Task[None]] = []
        initiator = Initiator(service_url, token=token, retry=RETRY, try_timeout=TRY_TIMEOUT)

        async def run(tx: Transaction) -> None:
            try:
                if tx.ending is Ending.KILLED:
                    await self._killed(tx, service_url, token)
                else:
                    self.outcomes[tx.gid] = await _initiate(initiator, tx)
            finally:
                limit.release()

        try:
            for tx in plan:
                while self._payments < tx.at:
                    self._paying.clear()
                    await self._paying.wait()
                await limit.acquire()
                tasks.append(asyncio.create_task(run(tx)))
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await initiator.close()
        self.loaded_at = time.monotonic()
        self._event(f"TCC load done: {len(plan)} transactions")

    async def _killed(self, tx: Transaction, service_url: str, token: str) -> None:
        """Run ``tx``'s initiator as a process and kill it with SIGKILL once its Trys
        answered. When a fault made them fail first (the initiator cancelled), again
        with a new gid, a few times."""
        for attempt in range(KILLED_ATTEMPTS):
            gid = tx.gid if attempt == 0 else f"{tx.gid}.{attempt}"
            self.outcomes[gid] = outcome = await self._kill_initiator(gid, service_url, token)
            if outcome == "killed":
                return

    async def _kill_initiator(self, gid: str, service_url: str, token: str) -> str:
        argv = [sys.executable, "-m", "soak.initiator", gid, service_url, str(KILLED_TIMEOUT)]
        env = {**base_env(), "SOAK_INITIATOR_TOKEN": token}
        with (self._logs / "initiators.log").open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        assert proc.stdout is not None
        try:
            try:
                async with asyncio.timeout(KILLED_PATIENCE):
                    line = await proc.stdout.readline()
            except TimeoutError:
                self._event(f"[yellow]initiator of {gid}: no Trys within {KILLED_PATIENCE} s[/]")
                return "ended-before-kill"
            if line.decode().strip() == TRIED:
                os.kill(proc.pid, signal.SIGKILL)
                self._event(f"initiator of {gid} (pid {proc.pid}) killed after its Trys")
                return "killed"
            code = await proc.wait()
            self._event(f"[yellow]initiator of {gid} ended ({code}) before its kill[/]")
            return "ended-before-kill"
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    # -- quiescence ----------------------------------------------------------------------

    async def settle(self) -> float | None:
        """Wait for the load to end, then until every transaction is confirmed or
        cancelled; the seconds that took from the load's end, None after the run's
        ``--timeout`` (or without TCC transactions)."""
        if self._load is None:
            return None
        within = self._o.timeout
        await self._load
        assert self.loaded_at is not None
        deadline = self.loaded_at + within
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                if await unfinished(self._service_database_url) == 0:
                    return time.monotonic() - self.loaded_at
            await asyncio.sleep(QUIET_POLL)
        self._event(f"[red]TCC: transactions not final {within:.0f} s after the load[/]")
        return None

    async def tally(self) -> TccTally | None:
        if not self.enabled:
            return None
        names = [p.name for p in self.parties]
        books = await read(self._database_url, self._service_database_url, names)
        return tally(books, self.outcomes)


async def _initiate(initiator: Initiator, tx: Transaction) -> str:
    """``tx`` as its initiator runs it; what the initiator saw (see
    :attr:`TccSide.outcomes`)."""
    try:
        async with initiator.transaction(tx.gid, timeout=TIMEOUT) as gtx:
            await gtx.try_all(branches(tx.payloads()))
            if tx.ending is Ending.CANCEL:
                raise GaveUp
        return "committed"
    except GaveUp:
        return "cancelled"
    except TryRefused:
        return "refused"
    except TryFailed:
        return "try-failed"
    except Conflict as exc:
        return "expired" if exc.code == Code.EXPIRED else "unknown"
    except ReliableMsgError:
        return "unknown"
