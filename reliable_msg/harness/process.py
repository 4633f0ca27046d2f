"""Processes a tool starts (``reliable-msg serve`` above all): started with their output
in a log file, awaited until ready, and stopped whatever happens.

Each tool keeps its own policy (which environment, which log, whether to restart a
process that dies); the starting, the readiness wait and the stopping are here.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from reliable_msg.errors import ReliableMsgError

#: Seconds a process gets to stop after SIGTERM before SIGKILL.
GRACE = 10.0


class NotReady(ReliableMsgError):
    """A started service did not answer ``/readyz`` in time, or exited first."""


def serve_argv(config: Path | None, *options: str) -> list[str]:
    """The command line of ``reliable-msg serve`` with ``config`` (None: the environment
    alone) and ``options`` (``--port``, say), run by this interpreter."""
    with_config = ["--config", str(config)] if config is not None else []
    return [sys.executable, "-m", "reliable_msg", *with_config, "serve", *options]


@dataclass
class Process:
    """One process, as a command line, an environment and a log file its output is
    appended to."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    def exit_code(self) -> int | None:
        """None while it runs (or was never started)."""
        return self.proc.poll() if self.proc is not None else None

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: no shutdown, connections and transactions cut where they are."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def reap(self, deadline: float) -> None:
        """Wait until ``deadline`` (monotonic) for it to exit, then SIGKILL it."""
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def tail(self, lines: int = 30) -> str:
        """The last ``lines`` of its log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def stop(processes: Iterable[Process], grace: float = GRACE) -> None:
    """SIGTERM to every one still running, then SIGKILL to any still there after
    ``grace`` seconds."""
    processes = list(processes)
    for process in processes:
        process.terminate()
    deadline = time.monotonic() + grace
    for process in processes:
        process.reap(deadline)


async def stop_gracefully(*procs: asyncio.subprocess.Process, grace: float = GRACE) -> list[int]:
    """:func:`stop` for processes started with :func:`asyncio.create_subprocess_exec`;
    their exit codes."""
    for proc in procs:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    return [proc.returncode for proc in procs if proc.returncode is not None]


def describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


async def wait_ready(
    url: str, process: Process | None = None, *, within: float = 30.0, every: float = 0.1
) -> None:
    """Wait until the service at ``url`` answers ``/readyz`` with 200. :class:`NotReady`
    after ``within`` seconds, or as soon as ``process`` (when given: a supervisor that
    restarts it passes none) has exited, with the end of its log."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    timeout = aiohttp.ClientTimeout(total=1)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while loop.time() < deadline:
            if process is not None and (code := process.exit_code()) is not None:
                raise NotReady(f"{process.name} {describe_exit(code)}; log:\n{process.tail()}")
            if await _ready(session, url):
                return
            await asyncio.sleep(every)
    log = f"; log:\n{process.tail()}" if process is not None else ""
    raise NotReady(f"the service at {url} is not ready after {within:.0f} s{log}")


async def _ready(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(f"{url}/readyz") as answer:
            return answer.status == 200
    except (aiohttp.ClientError, OSError, TimeoutError):
        return False


def blocking(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` to its end from synchronous code, in a thread of its own so that it
    also works under a running event loop (which it blocks meanwhile)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(coro)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="harness-blocking")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
