"""The TCC coordinator as real ``reliable-msg serve`` processes for the crash tests: its
configuration, its instances started, frozen and named as its rows name them, the test
as its initiator over the HTTP API, and its rows and event log read back."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from reliable_msg.harness.proxy import FaultProxy
from reliable_msg.sdk.tcc import Op
from reliable_msg.service.settings import Settings
from tests.conftest import PRODUCER, auth
from tests.helpers.service import Instance, remove_traces, running_async, write_config
from tests.helpers.tcc_parties import START, Party, run_trys
from tests.helpers.waiting import wait_until

#: What each branch's Try freezes and its Confirm takes.
QTY = 2
#: The transaction's timeout: far beyond the test, so that only a commit ends it.
TIMEOUT = 120.0
#: Seconds a successor may take to finish what a killed instance left (its lease first).
FINISH_WITHIN = 60.0
#: The coordinator's TCC settings: a call stuck in a stalled proxy outlives the moment
#: its instance is killed (call_timeout), and a short lease hands the transaction to
#: another instance soon after; failed calls are retried fast.
TCC = {"call_timeout": 8.0, "lease": 9.0, "backoff_base": 0.2, "backoff_cap": 1.0, "jitter": 0.0}


def coordinator(
    make_settings: Callable[..., Settings],
    tmp_path: Path,
    stack: AsyncExitStack,
    participants: dict[str, dict[str, Any]],
    **tcc: Any,
) -> Path:
    """The config file of the test's instances, calling ``participants``, with :data:`TCC`
    and then ``tcc`` as their ``[tcc]``; the queues and Redis keys they declare are
    removed at the end."""
    settings = make_settings(participants=participants, tcc={**TCC, **tcc})
    stack.push_async_callback(remove_traces, settings)
    # The participants' tables in full: a written config's tokens must be the real ones
    # (the harness on main writes them masked; tcc-initiator's caed960 fixes that).
    return write_config(settings, tmp_path / "config.toml", participants=participants)


async def start(stack: AsyncExitStack, config: Path, tmp_path: Path, name: str) -> Instance:
    return await stack.enter_async_context(running_async(config, tmp_path, name=name))


async def proxy_before(stack: AsyncExitStack, party: Party) -> FaultProxy:
    """A fault proxy in front of ``party``, flowing until the test stalls it."""
    return await stack.enter_async_context(FaultProxy("127.0.0.1", party.port))


def via(proxy: FaultProxy, party: Party) -> dict[str, Any]:
    return party.config(proxy.url("http", path=f"/tcc/{party.name}"))


def called_since(
    proxies: list[FaultProxy], before: list[int], calls: int = 1
) -> Callable[[], bool]:
    """Whether each proxy took ``calls`` new connections since it had ``before`` (the
    count of each, in order)."""
    return lambda: all(p.accepted - n >= calls for p, n in zip(proxies, before, strict=True))


def instance_name(instance: Instance) -> str:
    """The ``instance`` of its events and leases (``runtime.instance_name()``)."""
    return f"{socket.gethostname()}:{instance.pid}"


@contextmanager
def paused(instance: Instance) -> Iterator[None]:
    """``instance`` frozen (SIGSTOP) for the block, then woken (SIGCONT)."""
    os.kill(instance.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(instance.pid, signal.SIGCONT)


@asynccontextmanager
async def initiator(instance: Instance) -> AsyncIterator[httpx.AsyncClient]:
    """The order service's client of the coordinator at ``instance``."""
    async with httpx.AsyncClient(base_url=instance.url, headers=auth(PRODUCER), timeout=30) as c:
        yield c


async def begin_and_register(
    instance: Instance, gid: str, parties: list[Party]
) -> list[dict[str, Any]]:
    """Begin ``gid`` and register one branch per party (named like it); the branches as
    the coordinator answered them (try URL and proof each)."""
    async with initiator(instance) as api:
        begun = await api.post("/v1/tcc/transactions", json={"gid": gid, "timeout": TIMEOUT})
        assert begun.status_code == 201, begun.text
        branches = [
            {"branch": p.name, "participant": p.name, "payload": {"qty": QTY}} for p in parties
        ]
        registered = await api.post(
            f"/v1/tcc/transactions/{gid}/branches", json={"branches": branches}
        )
    assert registered.status_code == 200, registered.text
    answered: list[dict[str, Any]] = registered.json()["branches"]
    return answered


async def begin_and_try(instance: Instance, gid: str, parties: list[Party]) -> None:
    """Begin ``gid``, register one branch per party (named like it), run every Try."""
    await run_trys(gid, await begin_and_register(instance, gid, parties), {"qty": QTY})
    for party in parties:
        assert await party.account() == (START - QTY, QTY, 0)


async def decide(instance: Instance, gid: str, how: str = "commit") -> None:
    """The initiator's commit (or ``how="cancel"``), which the coordinator takes."""
    async with initiator(instance) as api:
        decided = await api.post(f"/v1/tcc/transactions/{gid}/{how}")
    assert decided.status_code == 200, decided.text
    assert decided.json()["status"] == {"commit": "confirming", "cancel": "cancelling"}[how]


async def commit(instance: Instance, gid: str) -> None:
    await decide(instance, gid)


async def transaction(db: asyncpg.Connection, gid: str) -> asyncpg.Record:
    row = await db.fetchrow("SELECT * FROM rmsg_tcc_transaction WHERE gid = $1", gid)
    assert row is not None
    return row


async def branches(db: asyncpg.Connection, gid: str) -> dict[str, asyncpg.Record]:
    rows = await db.fetch("SELECT * FROM rmsg_tcc_branch WHERE gid = $1", gid)
    return {r["branch"]: r for r in rows}


async def events(db: asyncpg.Connection, gid: str) -> list[asyncpg.Record]:
    return list(await db.fetch("SELECT * FROM rmsg_tcc_event WHERE gid = $1 ORDER BY id", gid))


async def finished(db: asyncpg.Connection, gid: str, status: str = "confirmed") -> None:
    async def done() -> bool:
        return bool((await transaction(db, gid))["status"] == status)

    await wait_until(done, within=FINISH_WITHIN, every=0.2)


def calls(
    log: list[asyncpg.Record], branch: str, op: Op = Op.CONFIRM
) -> list[tuple[str, int | None, str]]:
    """The Confirm (or ``op``) calls of ``branch`` in the event log: (outcome, HTTP
    status, instance)."""
    return [
        (e["outcome"], e["http_status"], e["instance"])
        for e in log
        if e["op"] == op.value and e["branch"] == branch
    ]


def moves(log: list[asyncpg.Record]) -> list[tuple[str, str]]:
    """The transaction's moves in the event log: (op, instance)."""
    return [(e["op"], e["instance"]) for e in log if e["branch"] is None]


async def blocked_recordings(database_url: str) -> int:
    """The coordinator's statements on branch rows that wait for a row lock (asked on a
    connection of its own: the test terminates the others)."""
    conn = await asyncpg.connect(database_url)
    try:
        n = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'reliable-msg' AND wait_event_type = 'Lock'"
            " AND query LIKE '%rmsg_tcc_branch%'"
        )
    finally:
        await conn.close()
    return int(n)
