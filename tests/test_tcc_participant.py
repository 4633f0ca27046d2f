"""The TCC participant SDK against real PostgreSQL, served over real HTTP: each branch's
Try, Confirm and Cancel has one effect, whatever the order and the repeats of the calls."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from reliable_msg.errors import ConfigError
from reliable_msg.sdk import tcc
from reliable_msg.sdk.tcc import Call, Op, Participant, Refused
from reliable_msg.tcc import BRANCH_HEADER, GID_HEADER, OP_HEADER, proof
from tests.helpers import tables
from tests.helpers.servers import serving_app

TOKEN = "inventory-token"
PREFIX = "/tcc/inventory"
START = 100


class Inventory:
    """A participant freezing stock on Try, selling it on Confirm, giving it back on
    Cancel; each handler also records its effect in ``inventory_effects``."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.participant = Participant(pool, TOKEN, name="inventory")
        self.fail: set[Op] = set()  #: ops whose handler raises once (then works)
        #: when set, each handler waits for it in its transaction, having set ``entered``
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.runs: Counter[Op] = Counter()
        p = self.participant
        p.on_try(self.freeze)
        p.on_confirm(self.sell)
        p.on_cancel(self.give_back)

    async def _effect(self, conn: asyncpg.Connection, call: Call, sql: str) -> None:
        self.runs[call.op] += 1
        await conn.execute(
            "INSERT INTO inventory_effects (gid, branch, op) VALUES ($1, $2, $3)",
            call.gid,
            call.branch,
            call.op.value,
        )
        if self.gate is not None:
            self.entered.set()
            await self.gate.wait()
        if call.op in self.fail:
            self.fail.discard(call.op)
            raise RuntimeError(f"{call.op.value} failed")
        updated = await conn.execute(sql, call.payload["qty"])
        if updated == "UPDATE 0":
            raise Refused("out of stock")

    async def freeze(self, conn: asyncpg.Connection, call: Call) -> None:
        sql = "UPDATE tcc_stock SET available = available - $1, frozen = frozen + $1"
        await self._effect(conn, call, sql + " WHERE available >= $1")

    async def sell(self, conn: asyncpg.Connection, call: Call) -> None:
        sql = "UPDATE tcc_stock SET frozen = frozen - $1, sold = sold + $1"
        await self._effect(conn, call, sql)

    async def give_back(self, conn: asyncpg.Connection, call: Call) -> None:
        sql = "UPDATE tcc_stock SET frozen = frozen - $1, available = available + $1"
        await self._effect(conn, call, sql)


@pytest.fixture
async def tcc_db(db: asyncpg.Connection) -> asyncpg.Connection:
    """The barrier table (installed twice: idempotent), a stock of 100 and no effects."""
    await tcc.install(db)
    await tcc.install(db)
    await db.execute(
        """
        CREATE TABLE IF NOT EXISTS tcc_stock (available int, frozen int, sold int);
        CREATE TABLE IF NOT EXISTS inventory_effects (gid text, branch text, op text);
        """
    )
    await tables.empty(db, "tcc_stock", "inventory_effects", tcc.BARRIER_TABLE)
    await db.execute(f"INSERT INTO tcc_stock VALUES ({START}, 0, 0)")
    return db


@pytest.fixture
async def inventory(pool: asyncpg.Pool, tcc_db: asyncpg.Connection) -> Inventory:
    return Inventory(pool)


@pytest.fixture
async def http(inventory: Inventory) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the inventory participant served on a free localhost port."""
    app = FastAPI()
    app.include_router(inventory.participant.router(PREFIX))
    async with serving_app(app) as url, httpx.AsyncClient(base_url=url + PREFIX) as client:
        yield client


def headers(gid: str, branch: str, op: Op, *, token: str = TOKEN) -> dict[str, str]:
    return {
        GID_HEADER: gid,
        BRANCH_HEADER: branch,
        OP_HEADER: op.value,
        "Authorization": f"Bearer {proof(token, gid, branch, op)}",
    }


async def call(
    http: httpx.AsyncClient, op: Op, gid: str = "g1", branch: str = "b1", qty: int = 2
) -> httpx.Response:
    body = {"gid": gid, "branch": branch, "op": op.value, "payload": {"qty": qty}}
    return await http.post(f"/{op.value}", json=body, headers=headers(gid, branch, op))


async def stock(db: asyncpg.Connection) -> tuple[int, int, int]:
    row = await db.fetchrow("SELECT available, frozen, sold FROM tcc_stock")
    assert row is not None
    return row["available"], row["frozen"], row["sold"]


async def barrier(db: asyncpg.Connection) -> set[tuple[str, str, str, str]]:
    rows = await db.fetch(f"SELECT gid, branch, op, origin FROM {tcc.BARRIER_TABLE}")
    return {(r["gid"], r["branch"], r["op"], r["origin"]) for r in rows}


async def snapshot(db: asyncpg.Connection) -> list[Any]:
    tables = ["tcc_stock", "inventory_effects", tcc.BARRIER_TABLE]
    return [sorted(map(tuple, await db.fetch(f"SELECT * FROM {t}"))) for t in tables]


def outcome(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    value: str = response.json()["outcome"]
    return value


def error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    code: str = response.json()["error"]["code"]
    return code


async def test_try_then_confirm_has_one_effect_each(
    http: httpx.AsyncClient, inventory: Inventory, tcc_db: asyncpg.Connection
) -> None:
    assert outcome(await call(http, Op.TRY)) == "done"
    assert await stock(tcc_db) == (98, 2, 0)
    assert outcome(await call(http, Op.CONFIRM)) == "done"
    assert await stock(tcc_db) == (98, 0, 2)
    assert await barrier(tcc_db) == {("g1", "b1", "try", "try"), ("g1", "b1", "confirm", "confirm")}


async def test_duplicate_calls_have_one_effect(
    http: httpx.AsyncClient, inventory: Inventory, tcc_db: asyncpg.Connection
) -> None:
    for op in (Op.TRY, Op.TRY, Op.CONFIRM, Op.CONFIRM, Op.CONFIRM):
        await call(http, op)
    assert [outcome(await call(http, op, branch="b2")) for op in (Op.TRY, Op.TRY)] == [
        "done",
        "duplicate",
    ]
    assert [outcome(await call(http, Op.CANCEL, branch="b2")) for _ in range(3)] == [
        "done",
        "duplicate",
        "duplicate",
    ]
    assert inventory.runs == {Op.TRY: 2, Op.CONFIRM: 1, Op.CANCEL: 1}
    assert await stock(tcc_db) == (98, 0, 2)


async def test_a_cancel_before_the_try_is_recorded_and_the_late_try_refused(
    http: httpx.AsyncClient, inventory: Inventory, tcc_db: asyncpg.Connection
) -> None:
    assert outcome(await call(http, Op.CANCEL)) == "empty_rollback"
    assert outcome(await call(http, Op.CANCEL)) == "duplicate"
    assert await barrier(tcc_db) == {
        ("g1", "b1", "try", "cancel"),
        ("g1", "b1", "cancel", "cancel"),
    }
    before = await snapshot(tcc_db)
    assert error(await call(http, Op.TRY), 409) == "cancelled_before_try"
    assert await snapshot(tcc_db) == before
    assert inventory.runs == {}
    assert await stock(tcc_db) == (START, 0, 0)


async def test_a_refused_try_writes_nothing(
    http: httpx.AsyncClient, inventory: Inventory, tcc_db: asyncpg.Connection
) -> None:
    before = await snapshot(tcc_db)
    response = await call(http, Op.TRY, qty=START + 1)
    assert error(response, 409) == "refused"
    assert response.json()["error"]["message"] == "out of stock"
    assert await snapshot(tcc_db) == before  # no effect row, no barrier row
    assert outcome(await call(http, Op.CANCEL)) == "empty_rollback"  # what the initiator does


@pytest.mark.parametrize("op", list(Op))
async def test_a_failing_handler_writes_nothing_and_a_retry_succeeds(
    http: httpx.AsyncClient,
    inventory: Inventory,
    tcc_db: asyncpg.Connection,
    op: Op,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if op is not Op.TRY:
        await call(http, Op.TRY)
    before = await snapshot(tcc_db)
    inventory.fail.add(op)
    with caplog.at_level(logging.ERROR, logger="reliable_msg.sdk.tcc"):
        assert error(await call(http, op), 500) == "internal"
    errors = [r for r in caplog.records if r.name == "reliable_msg.sdk.tcc"]
    logged = [tuple(getattr(r, k) for k in ("gid", "branch", "op")) for r in errors]
    assert logged == [("g1", "b1", op.value)]
    assert await snapshot(tcc_db) == before
    assert outcome(await call(http, op)) == "done"
    assert inventory.runs[op] == 2
    want = {Op.TRY: (98, 2, 0), Op.CONFIRM: (98, 0, 2), Op.CANCEL: (START, 0, 0)}
    assert await stock(tcc_db) == want[op]


async def twins(http: httpx.AsyncClient, inventory: Inventory, op: Op) -> list[httpx.Response]:
    """Two identical calls of ``op``, the second made while the first one's handler is in
    its transaction: it must wait on the barrier's key until the first one ends."""
    inventory.gate = asyncio.Event()
    first = asyncio.create_task(call(http, op))
    await asyncio.wait_for(inventory.entered.wait(), 5)
    second = asyncio.create_task(call(http, op))
    await asyncio.sleep(0.5)
    assert not second.done() and inventory.runs[op] == 1  # blocked before its handler
    inventory.gate.set()
    return [await first, await second]


@pytest.mark.parametrize("op", list(Op))
async def test_concurrent_duplicates_wait_and_run_once(
    http: httpx.AsyncClient, inventory: Inventory, tcc_db: asyncpg.Connection, op: Op
) -> None:
    if op is not Op.TRY:
        await call(http, Op.TRY)
    assert [outcome(a) for a in await twins(http, inventory, op)] == ["done", "duplicate"]
    assert inventory.runs[op] == 1
    want = {Op.TRY: (98, 2, 0), Op.CONFIRM: (98, 0, 2), Op.CANCEL: (START, 0, 0)}
    assert await stock(tcc_db) == want[op]


async def test_a_failing_twin_lets_the_waiting_one_run(
    http: httpx.AsyncClient, inventory: Inventory, tcc_db: asyncpg.Connection
) -> None:
    await call(http, Op.TRY)
    inventory.fail = {Op.CONFIRM}
    answers = await twins(http, inventory, Op.CONFIRM)
    assert [a.status_code for a in answers] == [500, 200]
    assert inventory.runs[Op.CONFIRM] == 2
    assert await stock(tcc_db) == (98, 0, 2)


async def test_a_cancel_waits_for_its_running_try_then_gives_back(
    http: httpx.AsyncClient, inventory: Inventory, tcc_db: asyncpg.Connection
) -> None:
    inventory.gate = asyncio.Event()
    trying = asyncio.create_task(call(http, Op.TRY))
    await asyncio.wait_for(inventory.entered.wait(), 5)
    cancelling = asyncio.create_task(call(http, Op.CANCEL))
    await asyncio.sleep(0.5)
    assert not cancelling.done()  # neither an empty rollback nor a second handler
    assert inventory.runs == {Op.TRY: 1}
    inventory.gate.set()
    assert [outcome(await trying), outcome(await cancelling)] == ["done", "done"]
    assert await stock(tcc_db) == (START, 0, 0)


def _good(op: Op = Op.CONFIRM) -> tuple[dict[str, str], bytes]:
    body = {"gid": "g1", "branch": "b1", "op": op.value, "payload": {"qty": 2}}
    return headers("g1", "b1", op), json.dumps(body).encode()


def _without(name: str) -> tuple[dict[str, str], bytes]:
    sent, body = _good()
    del sent[name]
    return sent, body


def _body(**changes: Any) -> tuple[dict[str, str], bytes]:
    body = {"gid": "g1", "branch": "b1", "op": "confirm", "payload": {"qty": 2}, **changes}
    return headers("g1", "b1", Op.CONFIRM), json.dumps(body).encode()


def _proof_of(gid: str, branch: str, op: Op) -> tuple[dict[str, str], bytes]:
    sent, body = _good()
    sent["Authorization"] = f"Bearer {proof(TOKEN, gid, branch, op)}"
    return sent, body


def _proof_with(token: str) -> tuple[dict[str, str], bytes]:
    sent, body = _good()
    return {**sent, **headers("g1", "b1", Op.CONFIRM, token=token)}, body


def _ids(gid: str) -> tuple[dict[str, str], bytes]:
    body = {"gid": gid, "branch": "b1", "op": "confirm", "payload": {}}
    return headers(gid, "b1", Op.CONFIRM), json.dumps(body).encode()


REFUSALS: dict[str, tuple[tuple[dict[str, str], bytes], int, str]] = {
    "no headers": (({}, _good()[1]), 401, "unauthorized"),
    "no proof": (_without("Authorization"), 401, "unauthorized"),
    "no gid header": (_without(GID_HEADER), 401, "unauthorized"),
    "no op header": (_without(OP_HEADER), 401, "unauthorized"),
    "wrong token": (_proof_with("x"), 401, "unauthorized"),
    "proof of another op": (_proof_of("g1", "b1", Op.TRY), 401, "unauthorized"),
    "proof of another branch": (_proof_of("g1", "b2", Op.CONFIRM), 401, "unauthorized"),
    "proof of another gid": (_proof_of("g2", "b1", Op.CONFIRM), 401, "unauthorized"),
    "op header of another path": ((headers("g1", "b1", Op.CANCEL), _good()[1]), 400, "bad_request"),
    "body of another gid": (_body(gid="g2"), 400, "bad_request"),
    "body of another branch": (_body(branch="b2"), 400, "bad_request"),
    "body of another op": (_body(op="cancel"), 400, "bad_request"),
    "body without gid": (_body(gid=None), 400, "bad_request"),
    "body not an object": ((_good()[0], b"[1]"), 400, "bad_request"),
    "bad json": ((_good()[0], b"{not json"), 400, "invalid_json"),
    "bad id": (_ids("g 1/../"), 400, "bad_request"),
    "id too long": (_ids("g" * 201), 400, "bad_request"),
    "oversized body": (_body(payload="x" * tcc.MAX_BODY), 413, "payload_too_large"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_a_refused_call_runs_nothing(
    http: httpx.AsyncClient, inventory: Inventory, tcc_db: asyncpg.Connection, case: str
) -> None:
    await call(http, Op.TRY)
    before = await snapshot(tcc_db)
    (sent, body), status, code = REFUSALS[case]
    response = await http.post("/confirm", content=body, headers=sent)
    assert error(response, status) == code
    assert await snapshot(tcc_db) == before
    assert inventory.runs == {Op.TRY: 1}


async def test_an_oversized_chunked_body_is_refused(
    http: httpx.AsyncClient, inventory: Inventory, tcc_db: asyncpg.Connection
) -> None:
    sent, _ = _good()

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(tcc.MAX_BODY // 1024 + 1):
            yield b" " * 1024

    response = await http.post("/confirm", content=chunks(), headers=sent)
    assert error(response, 413) == "payload_too_large"
    assert inventory.runs == {}


async def test_a_router_needs_every_handler(pool: asyncpg.Pool) -> None:
    p = Participant(pool, TOKEN, name="half")

    @p.on_try
    async def freeze(conn: asyncpg.Connection, call: Call) -> None:
        pass

    with pytest.raises(ConfigError, match="confirm, cancel"):
        p.router()
    with pytest.raises(ConfigError, match="second try"):
        p.on_try(freeze)


async def test_purge_keeps_unfinished_and_young_branches(
    pool: asyncpg.Pool, tcc_db: asyncpg.Connection
) -> None:
    rows = [  # gid, op, origin, age in days
        ("old-confirmed", "try", "try", 8),
        ("old-confirmed", "confirm", "confirm", 8),
        ("old-cancelled", "try", "try", 9),
        ("old-cancelled", "cancel", "cancel", 8),
        ("old-empty", "try", "cancel", 8),
        ("old-empty", "cancel", "cancel", 8),
        ("old-trying", "try", "try", 30),  # a lone Try: its Cancel may still come
        ("young", "try", "try", 0),
        ("young", "confirm", "confirm", 0),
        ("half-young", "try", "try", 8),
        ("half-young", "cancel", "cancel", 0),
    ]
    for gid, op, origin, days in rows:
        await tcc_db.execute(
            f"INSERT INTO {tcc.BARRIER_TABLE} (gid, branch, op, origin, created_at)"
            " VALUES ($1, 'b1', $2, $3, now() - make_interval(days => $4))",
            gid,
            op,
            origin,
            days,
        )
    assert await tcc.purge_barriers(pool) == 6
    left = {(gid, op) for gid, _, op, _ in await barrier(tcc_db)}
    assert left == {
        ("old-trying", "try"),
        ("young", "try"),
        ("young", "confirm"),
        ("half-young", "try"),
        ("half-young", "cancel"),
    }
    assert await tcc.purge_barriers(pool, older_than=0) == 4  # the finished young ones
