"""Where the CPU of a bench run goes: per group of processes, read from ``/proc``.

The groups are the service, the producer processes, the consumer process, the
PostgreSQL backends of the bench's databases and RabbitMQ; ``machine`` is what every
process of the machine used in the same time (other work on a shared machine included),
out of all cores over the run's seconds.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

import asyncpg

from reliable_msg.harness.servers import machine_rabbitmq_pids

#: Seconds between two samples of a process's CPU time; one that exits between two
#: samples loses what it used since the last one.
EVERY = 0.1
#: The PostgreSQL backends are looked up less often: that is a query.
BACKENDS_EVERY = 0.5


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time process ``pid`` has used so far; None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_seconds() -> tuple[float, float]:
    """CPU seconds the machine has been busy and has had in all, all cores together."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle and iowait
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - idle) / hz, sum(ticks) / hz


class CpuWatch:
    """Samples the CPU time of a run's processes from :meth:`start` until :meth:`stop`."""

    def __init__(self, postgres_dsn: str | None = None, databases: Sequence[str] = ()) -> None:
        """Without ``postgres_dsn`` only the processes given are watched (and the
        machine): no PostgreSQL backends, no RabbitMQ."""
        self._dsn = postgres_dsn
        self._databases = list(databases)
        self._group: dict[int, str] = {}
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._machine: tuple[float, float] = (0.0, 0.0)
        self._task: asyncio.Task[None] | None = None

    def track(self, pid: int, group: str, *, from_birth: bool = False) -> None:
        """Count ``pid``'s CPU time in ``group`` from now, or from its start."""
        used = cpu_seconds(pid)
        if used is None or pid in self._group:
            return
        self._first[pid] = 0.0 if from_birth else used
        self._last[pid] = used
        self._group[pid] = group

    async def start(self, pids: dict[int, str]) -> None:
        """Start counting ``pids`` (pid → group) and, given a DSN, RabbitMQ and the
        bench's backends."""
        self._machine = machine_seconds()
        for pid, group in pids.items():
            self.track(pid, group)
        conn = None
        if self._dsn is not None:
            # The machine's node only: not a test's cluster, nor a rabbitmqctl.
            for pid in machine_rabbitmq_pids():
                self.track(pid, "rabbitmq")
            conn = await asyncpg.connect(self._dsn)
            for pid in await self._backends(conn):
                self.track(pid, "postgres")
        self._task = asyncio.create_task(self._sample(conn))

    async def stop(self) -> dict[str, float]:
        """Stop; CPU seconds per group, and the machine's: ``machine`` busy out of
        ``capacity`` (all cores over the time watched)."""
        await self.close()
        self._sample_once()
        busy, total = machine_seconds()
        used: dict[str, float] = {}
        for pid, group in self._group.items():
            used[group] = used.get(group, 0.0) + self._last[pid] - self._first[pid]
        used["machine"] = busy - self._machine[0]
        used["capacity"] = total - self._machine[1]
        return used

    async def close(self) -> None:
        """Stop sampling (also when the run failed)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def _sample_once(self) -> None:
        for pid in self._group:
            used = cpu_seconds(pid)
            if used is not None:
                self._last[pid] = used

    async def _sample(self, conn: asyncpg.Connection | None) -> None:
        try:
            loop = asyncio.get_running_loop()
            next_lookup = 0.0
            while True:
                self._sample_once()
                if conn is not None and loop.time() >= next_lookup:
                    # A backend born during the run counts from its start.
                    for pid in await self._backends(conn):
                        self.track(pid, "postgres", from_birth=True)
                    next_lookup = loop.time() + BACKENDS_EVERY
                await asyncio.sleep(EVERY)
        finally:
            if conn is not None:
                await conn.close()

    async def _backends(self, conn: asyncpg.Connection) -> list[int]:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = ANY($1::text[])", self._databases
        )
        return [r["pid"] for r in rows]
