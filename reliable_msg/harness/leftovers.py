"""What the harness's clusters (:mod:`.rabbit_cluster`, :mod:`.redis_cluster`) share to
leave nothing behind: a cluster destroyed after its block (also when its start fails),
and the reading, killing and awaiting of the processes a killed run left running."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

#: Seconds killed processes get to be gone.
KILL_WITHIN = 10.0


class Cluster(ABC):
    """Started by :meth:`start`, removed with all it wrote by :meth:`destroy` (safe to
    call twice); ``with cluster:`` does both, and destroys it too if the start fails."""

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def destroy(self) -> None: ...

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()


def kill_all(running: Callable[[], list[int]], within: float = KILL_WITHIN) -> None:
    """SIGKILL the pids ``running()`` names, then wait (``within`` seconds at the most)
    until it names none."""
    for pid in running():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + within
    while running() and time.monotonic() < deadline:
        time.sleep(0.05)


def cmdline(pid: int) -> list[bytes]:
    """The command line of process ``pid``; [] if there is none (any more)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def pid_in(pidfile: Path, program: bytes) -> int | None:
    """The pid in ``pidfile`` if that process runs, is ``program`` and works in the pid
    file's directory (the servers are started there). A pid file outlives its process,
    and pids come round again within minutes here (``pid_max`` 32768): the pid may be
    another server's by now, of a live cluster or the machine's own, never to be killed."""
    text = read(pidfile)
    if not text.isdigit() or not running(pid := int(text)):
        return None
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd").removesuffix(" (deleted)")
    except OSError:
        return None
    ours = cwd == str(pidfile.parent.resolve())
    return pid if ours and any(program in arg for arg in cmdline(pid)) else None


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and is no zombie. (Its working directory and
    command line go before its sockets are closed: a process being killed is no longer
    ``pid_in`` its pid file, and is still running.)"""
    stat = read(Path(f"/proc/{pid}/stat"))
    return bool(stat) and stat.rsplit(")", 1)[-1].split()[0] != "Z"


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (as anyone's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read(path: Path) -> str:
    """The text of ``path``, stripped; "" if it cannot be read."""
    try:
        return path.read_text().strip()
    except OSError:
        return ""
