"""The TCC path: a real service process as the coordinator, three participants each a
process of its own (the harness's :mod:`~reliable_msg.harness.tcc_party`: the
participant SDK, its barrier and an account row), and an initiator process driving
global transactions of one branch at each through the initiator SDK.

A transaction's latency runs from the initiator's begin call (its clock) to the moment
the coordinator recorded it confirmed, every branch's Confirm answered (``finished_at``,
the database's clock; one machine, one clock): the initiator does not poll for it, so
neither its polling interval nor its polls' load is in the figures. The run is timed
from the first begin to the last transaction confirmed; then the books are checked (each
branch tried and confirmed once, nothing frozen left, every quantity taken).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from reliable_msg.errors import ReliableMsgError
from reliable_msg.harness import tcc_party
from reliable_msg.harness.ports import free_ports
from reliable_msg.harness.process import Process, stop, stop_gracefully, wait_ready
from reliable_msg.tools.bench import e2e
from reliable_msg.tools.bench.cpu import CpuWatch

#: The participants, one branch at each per transaction.
PARTIES = ("inventory", "credit", "wms")
#: What each Try freezes and its Confirm takes.
QTY = 1
#: Each account at the start: never the limit of a run.
START = 1_000_000_000
#: Connections of each participant's pool: its Trys and Confirms all update its one
#: account row, so more would only wait on that row's lock (and PostgreSQL is shared).
POOL_SIZE = 4
#: The transactions' timeout (the coordinator's deadline): far beyond a Try's time.
TIMEOUT = 60.0
#: Seconds every process gets to be up and connected before the first begin.
WARM_UP = 1.5
#: Seconds the last transaction gets to be confirmed after the initiator is done.
CONFIRM_WITHIN = 60.0
#: The CPU groups of a TCC run, as the table names them; ``machine`` is every process.
CPU_GROUPS = {
    "service": "service (coordinator)",
    "participants": "participant processes (3)",
    "initiator": "initiator process",
    "postgres": "PostgreSQL backends",
    "machine": "whole machine",
}


class BooksWrong(ReliableMsgError):
    """The run's effects are not what its transactions should have left."""


@dataclass(frozen=True)
class Databases:
    """The coordinator's database and the participants' (one schema each)."""

    service: str
    parties: str


@dataclass
class TccRun:
    transactions: int
    elapsed: float
    cpu: dict[str, float]
    #: Milliseconds per transaction: begin → confirmed, begin → commit answered,
    #: commit answered → confirmed.
    phases: dict[str, list[float]]

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "transactions": self.transactions,
            "branches": len(PARTIES),
            "seconds": round(self.elapsed, 3),
            "tx_per_s": round(self.transactions / self.elapsed, 1),
            "cpu_ms_per_tx": {
                group: round(self.cpu[group] / self.transactions * 1000, 3)
                for group in CPU_GROUPS
                if group in self.cpu
            },
            "machine_busy": round(self.cpu["machine"] / self.cpu["capacity"], 3)
            if self.cpu.get("capacity")
            else None,
        }
        out.update(e2e._spread(self.phases["begin_to_confirmed"]))
        out["phases_ms"] = {name: e2e._spread(ms) for name, ms in self.phases.items() if ms}
        return out


async def run_tcc(
    run_dir: Path,
    databases: Databases,
    amqp_url: str,
    redis_url: str,
    *,
    transactions: int,
    concurrency: int,
    names: str = e2e.NAMES,
    tick: Callable[[int], None] = lambda _: None,
) -> TccRun:
    """Run ``transactions`` global transactions, ``concurrency`` at once, through a fresh
    coordinator and fresh participants; checked, timed and their CPU counted."""
    await asyncio.to_thread(run_dir.mkdir, parents=True, exist_ok=True)
    await _fresh(databases.parties)
    tokens = {name: secrets.token_hex(16) for name in PARTIES}
    async with parties(run_dir, databases.parties, tokens) as served:
        participants = {
            name: {"url": url, "token": tokens[name]} for name, (_, url) in served.items()
        }
        async with e2e.service(
            run_dir, databases.service, amqp_url, redis_url, names=names, participants=participants
        ) as svc:
            pids = {svc.pid: "service"} | {p.pid: "participants" for p, _ in served.values()}
            return await _drive(svc, databases, run_dir, pids, transactions, concurrency, tick)


@asynccontextmanager
async def parties(
    run_dir: Path, database_url: str, tokens: dict[str, str]
) -> AsyncIterator[dict[str, tuple[Process, str]]]:
    """The participant processes, ready: name → (process, URL of its endpoints)."""
    ports = free_ports(len(PARTIES))
    started: dict[str, tuple[Process, str]] = {}
    try:
        for name, port in zip(PARTIES, ports, strict=True):
            env = {**os.environ, "RMSG_PARTY_TOKEN": tokens[name]}
            argv = tcc_party.argv(name, port, database_url, start=START, pool_size=POOL_SIZE)
            log = run_dir / f"party-{name}.log"
            log.unlink(missing_ok=True)
            process = Process(name, argv, env, log)
            process.start()
            base = f"http://127.0.0.1:{port}"
            started[name] = (process, base + tcc_party.path(name))
            await wait_ready(base, process, within=e2e.STARTUP)
        yield started
    finally:
        await asyncio.to_thread(stop, [p for p, _ in started.values()], e2e.GRACE)


async def _drive(
    svc: e2e.Service,
    databases: Databases,
    run_dir: Path,
    pids: dict[int, str],
    transactions: int,
    concurrency: int,
    tick: Callable[[int], None],
) -> TccRun:
    start_at = time.time() + WARM_UP
    out = run_dir / "initiated.json"
    spec = {
        "url": svc.url,
        "token": svc.producer_token,
        "participants": list(PARTIES),
        "qty": QTY,
        "timeout": TIMEOUT,
        "transactions": transactions,
        "concurrency": concurrency,
        "start_at": start_at,
        "out": str(out),
    }
    admin_dsn = f"{databases.service.rsplit('/', 1)[0]}/postgres"
    watch = CpuWatch(admin_dsn, [_name(databases.service), _name(databases.parties)])
    # Connected before the run: a PostgreSQL shared with others may be full by its end.
    db = await asyncpg.connect(svc.database_url)
    initiator = await e2e._worker("initiate", spec, stdout=True)
    progress = asyncio.create_task(e2e._follow(initiator, tick))
    watching = asyncio.create_task(
        e2e._watch_from(start_at, watch, {**pids, initiator.pid: "initiator"})
    )
    try:
        if await initiator.wait() != 0:
            raise RuntimeError("the initiator process failed; see its output above")
        last = await _wait_confirmed(db, transactions)
        await watching
        cpu = await watch.stop()
        confirmed = await _finished(db)
    finally:
        await db.close()
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        await watch.close()
        await stop_gracefully(initiator, grace=e2e.GRACE)
    await progress
    initiated: dict[str, list[float]] = json.loads(out.read_text())
    await check_books(databases.parties, transactions)
    return TccRun(transactions, last - start_at, cpu, _phases(initiated, confirmed))


async def _wait_confirmed(conn: asyncpg.Connection, transactions: int) -> float:
    """Wait until ``transactions`` are confirmed; the wall time of the last one."""
    deadline = time.monotonic() + CONFIRM_WITHIN
    while time.monotonic() < deadline:
        row = await conn.fetchrow(
            "SELECT count(*) AS n, extract(epoch FROM max(finished_at)) AS last"
            " FROM rmsg_tcc_transaction WHERE status = 'confirmed'"
        )
        assert row is not None
        if row["n"] >= transactions:
            return float(row["last"])
        await asyncio.sleep(0.01)
    raise RuntimeError(f"not every transaction was confirmed within {CONFIRM_WITHIN:g} s")


async def _finished(conn: asyncpg.Connection) -> dict[str, float]:
    """When each confirmed transaction was recorded confirmed, as wall time."""
    rows = await conn.fetch(
        "SELECT gid, extract(epoch FROM finished_at) AS at FROM rmsg_tcc_transaction"
        " WHERE status = 'confirmed'"
    )
    return {r["gid"]: float(r["at"]) for r in rows}


def _phases(
    initiated: dict[str, list[float]], confirmed: dict[str, float]
) -> dict[str, list[float]]:
    """Milliseconds per transaction from its begin call to its confirmation, split at the
    commit's answer."""
    out: dict[str, list[float]] = {
        "begin_to_confirmed": [],
        "begin_to_committed": [],
        "committed_to_confirmed": [],
    }
    for gid, (began, committed) in initiated.items():
        if gid not in confirmed:
            continue
        out["begin_to_confirmed"].append((confirmed[gid] - began) * 1000)
        out["begin_to_committed"].append((committed - began) * 1000)
        out["committed_to_confirmed"].append((confirmed[gid] - committed) * 1000)
    return out


async def check_books(database_url: str, transactions: int) -> None:
    """:class:`BooksWrong` unless every participant tried and confirmed each of the
    ``transactions`` exactly once, with all it froze taken."""
    conn = await asyncpg.connect(database_url)
    try:
        counted = await tcc_party.tally(conn, PARTIES)
        accounts = {name: await tcc_party.account(conn, name) for name in PARTIES}
    finally:
        await conn.close()
    wrong = [f"{run} ran {n} times" for run, n in counted.twice()[:5]]
    for name, (available, frozen, taken) in accounts.items():
        if (available, frozen, taken) != (START - transactions * QTY, 0, transactions * QTY):
            wrong.append(f"{name}: available {available}, frozen {frozen}, taken {taken}")
    runs = sum(counted.values())
    if runs != 2 * transactions * len(PARTIES):
        wrong.append(f"{runs} handler runs for {transactions} transactions")
    if wrong:
        raise BooksWrong("; ".join(wrong))


async def _fresh(dsn: str) -> None:
    """An empty database at ``dsn``."""
    base, name = dsn.rsplit("/", 1)
    admin = await asyncpg.connect(f"{base}/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()


def _name(dsn: str) -> str:
    return dsn.rsplit("/", 1)[1]
