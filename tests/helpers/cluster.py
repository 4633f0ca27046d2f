"""What the RabbitMQ cluster tests watch and drive: the switch as every instance reports
it, the node a process is attached to, and many producers at once."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from reliable_msg.sdk.producer import Producer


@dataclass
class ReadyWatch:
    """``/readyz`` of every instance, read every ``every`` seconds while it runs."""

    urls: list[str]
    every: float = 0.1
    #: (mode, status) as read, counted over every reading of every instance.
    seen: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: The switch history the last reading showed.
    history: list[dict[str, Any]] = field(default_factory=list)
    last: dict[str, dict[str, Any]] = field(default_factory=dict)
    unanswered: int = 0

    @property
    def modes(self) -> set[str]:
        return {mode for mode, _ in self.seen}

    async def read(self, client: httpx.AsyncClient, url: str) -> dict[str, Any] | None:
        try:
            answer = await client.get(f"{url}/readyz")
        except httpx.TransportError:
            self.unanswered += 1
            return None
        report: dict[str, Any] = answer.json()
        self.seen[(report["mode"], report["status"])] += 1
        if report.get("history"):
            self.history = report["history"]
        self.last[url] = report
        return report

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                await asyncio.gather(*(self.read(client, url) for url in self.urls))
                await asyncio.sleep(self.every)

    def modes_now(self) -> set[str]:
        return {report["mode"] for report in self.last.values()}


@asynccontextmanager
async def watching(urls: list[str]) -> AsyncIterator[ReadyWatch]:
    """A :class:`ReadyWatch` running for the block."""
    watch = ReadyWatch(urls)
    task = asyncio.create_task(watch.run())
    try:
        yield watch
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def peer_ports(pid: int) -> Counter[int]:
    """The remote localhost ports of the established TCP connections process ``pid``
    holds, each with how many it holds (from ``/proc``)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports: Counter[int] = Counter()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            established = cols[3] == "01"
            if established and cols[9] in inodes:
                ports[int(cols[2].rsplit(":", 1)[1], 16)] += 1
    return ports


async def produce_many(
    producer: Producer,
    pool: asyncpg.Pool,
    ids: list[str],
    *,
    workers: int = 16,
    confirmed: list[str] | None = None,
) -> None:
    """Every id in a transaction of its own (an ``sdk_orders`` row and the message),
    from ``workers`` at once; each must be confirmed. ``confirmed`` collects them as
    they are."""
    todo = list(reversed(ids))
    done = confirmed if confirmed is not None else []

    async def worker() -> None:
        while todo:
            id = todo.pop()
            async with pool.acquire() as conn:
                async with producer.transaction(conn, "order.paid", {"id": id}, id=id) as sent:
                    await conn.execute("INSERT INTO sdk_orders (id) VALUES ($1)", id)
            assert sent.confirmed, id
            done.append(id)

    await asyncio.gather(*(worker() for _ in range(workers)))
