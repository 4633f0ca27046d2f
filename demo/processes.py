"""The demo's processes: started with their logs in the run directory, restarted when
they die (the injected crashes kill them), and stopped whatever happens."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika

from reliable_msg.errors import ReliableMsgError
from reliable_msg.harness.process import GRACE, Process, describe_exit, stop

from .errors import DemoError

#: How often the supervisor looks for dead processes.
POLL = 0.1
#: How each start of a process begins in its log.
START_MARK = "--- "


@dataclass
class Child(Process):
    """One process of the demo, restarted when it dies as often as planned."""

    max_restarts: int = 0  #: the crashes planned for it; one more is a failure
    tier: int = 1  #: children of a higher tier depend on those of lower ones and stop first
    restarts: int = 0

    def start(self) -> None:
        with self.log.open("ab") as out:
            stamp = time.strftime("%H:%M:%S")
            out.write(f"{START_MARK}{stamp} start: {' '.join(self.argv)}\n".encode())
        super().start()


class Supervisor:
    """Restarts a child that dies, up to its ``max_restarts``; stops all at the end."""

    def __init__(self, on_event: Callable[[str], None]) -> None:
        self.children: dict[str, Child] = {}
        self._on_event = on_event
        self._stopping = False
        #: The signal that interrupted the run, if one did.
        self.interrupted: signal.Signals | None = None

    def cancel_on_signals(self) -> None:
        """On SIGINT or SIGTERM: no more restarts (a terminal's Ctrl-C reaches the
        children too) and cancel the current task, so that its ``finally`` stops every
        process."""
        main = asyncio.current_task()
        assert main is not None

        def interrupt(sig: signal.Signals) -> None:
            self.stop_restarting()
            if self.interrupted is None:
                self.interrupted = sig
                main.cancel()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, interrupt, sig)

    async def run(self, scenario: Coroutine[Any, Any, int]) -> int:
        """Run ``scenario`` while restarting the processes that die; a process that dies
        more often than allowed ends the scenario with its error."""
        watcher = asyncio.create_task(self.watch())
        work = asyncio.create_task(scenario)
        try:
            await asyncio.wait({watcher, work}, return_when=asyncio.FIRST_COMPLETED)
            if watcher.done():
                watcher.result()
            return await work
        finally:
            for task in (watcher, work):
                task.cancel()
            await asyncio.gather(watcher, work, return_exceptions=True)

    def start(self, child: Child) -> Child:
        self.children[child.name] = child
        child.start()
        return child

    async def watch(self) -> None:
        """Run until cancelled; raise :class:`DemoError` when a child dies too often."""
        while not self._stopping:
            for child in list(self.children.values()):
                code = child.exit_code()
                if code is not None and not self._stopping:
                    self._restart(child, code)
            await asyncio.sleep(POLL)

    def _restart(self, child: Child, code: int) -> None:
        if child.restarts >= child.max_restarts:
            raise DemoError(
                f"{child.name} {describe_exit(code)} (restarted {child.restarts} times already);"
                f" its log {child.log} ends with:\n{child.tail()}"
            )
        child.restarts += 1
        self._on_event(f"{child.name} {describe_exit(code)}: restarting it (#{child.restarts})")
        child.start()

    def kill(self, name: str) -> Child:
        """SIGKILL the child ``name`` and stop watching it: a planned death, not
        restarted."""
        child = self.children.pop(name)
        child.kill()
        self._on_event(f"{name} killed by SIGKILL (pid {child.pid}); not restarted")
        return child

    def stop_restarting(self) -> None:
        self._stopping = True

    def stop_all(self, grace: float = GRACE) -> None:
        """Stop every child, tier by tier from the highest: SIGTERM to the tier, then
        SIGKILL to any still there after ``grace`` seconds."""
        self._stopping = True
        for tier in sorted({c.tier for c in self.children.values()}, reverse=True):
            stop([c for c in self.children.values() if c.tier == tier], grace)


def base_env() -> dict[str, str]:
    """This process's environment without any RMSG_* or DEMO_* setting of the caller's
    (the Makefile exports RMSG_DATABASE_URL, for one), so each process gets only ours."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("RMSG_", "DEMO_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def until(
    predicate: Callable[[], Awaitable[bool]], within: float, failure: str, every: float = 0.2
) -> None:
    """Poll the async ``predicate`` until it is true; :class:`DemoError` after ``within``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            if await predicate():
                return
        except (OSError, aio_pika.exceptions.AMQPError, ReliableMsgError):
            pass
        if loop.time() > deadline:
            raise DemoError(failure)
        await asyncio.sleep(every)


#: Seconds a control command (``rabbitmqctl``, ``pg_ctlcluster``, ``reliable-msg
#: migrate``) may take.
CTL_TIMEOUT = 120.0


async def run_logged(argv: Sequence[str], log: Path, *, env: dict[str, str] | None = None) -> None:
    """Run a command to its end with its output appended to ``log``; :class:`DemoError`
    unless it exits 0. It runs in a session of its own (a terminal's Ctrl-C does not cut
    it halfway) and a cancelled caller still lets it finish."""
    with log.open("ab") as out:
        out.write(f"{START_MARK}{time.strftime('%H:%M:%S')} {' '.join(argv)}\n".encode())
        out.flush()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise DemoError(f"cannot run {argv[0]}: {exc}") from exc
        try:
            code = await asyncio.wait_for(asyncio.shield(proc.wait()), CTL_TIMEOUT)
        except TimeoutError as exc:
            raise DemoError(f"{' '.join(argv)} took over {CTL_TIMEOUT:.0f} s") from exc
    if code != 0:
        raise DemoError(f"{' '.join(argv)} failed ({code}); see {log}:\n{_tail(log)}")


def _tail(log: Path, chars: int = 2000) -> str:
    return log.read_text(errors="replace")[-chars:]
