"""The seed's pay-order as TCC participants with their own business tables in the test
database, served as real uvicorn servers: ``order`` (the initiator's own local step:
CREATED → UPDATING → PAYED / CANCELED), ``inventory`` (available → frozen → sold, or back
to available), ``credit`` (points prepared → added, or cleared) and ``wms`` (a delivery
order UNKNOWN → CREATED / CANCELED, one per transaction). Every handler run is counted
in ``shop_effects``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import asyncpg
from fastapi import FastAPI

from reliable_msg.harness.ports import free_port
from reliable_msg.sdk.tcc import BARRIER_TABLE, Branch, Call, Participant, Refused, install
from reliable_msg.tcc import Op
from tests.helpers import tables
from tests.helpers.servers import serving_app

#: Each participant's token (the key of its calls' proofs).
TOKENS = {name: f"{name}-tcc-token" for name in ("order", "inventory", "credit", "wms")}
MEMBER = 1  #: the one member whose points the orders add to
START_POINTS = 1190

SCHEMA = """
CREATE TABLE IF NOT EXISTS shop_orders (id int PRIMARY KEY, status text NOT NULL);
CREATE TABLE IF NOT EXISTS shop_stock (available int NOT NULL, frozen int NOT NULL,
                                       sold int NOT NULL);
CREATE TABLE IF NOT EXISTS shop_member (id int PRIMARY KEY, points int NOT NULL,
                                        prepared int NOT NULL);
CREATE TABLE IF NOT EXISTS shop_delivery (gid text PRIMARY KEY, order_id int NOT NULL,
                                          status text NOT NULL);
CREATE TABLE IF NOT EXISTS shop_effects (participant text, gid text, branch text, op text);
"""
TABLES = ("shop_orders", "shop_stock", "shop_member", "shop_delivery", "shop_effects")


async def reset(db: asyncpg.Connection, *, stock: int, orders: int) -> None:
    """Empty tables, ``stock`` available, orders 1..``orders`` CREATED."""
    await install(db)
    await db.execute(SCHEMA)
    await tables.empty(db, *TABLES, BARRIER_TABLE)
    await db.execute("INSERT INTO shop_stock VALUES ($1, 0, 0)", stock)
    await db.execute("INSERT INTO shop_member VALUES ($1, $2, 0)", MEMBER, START_POINTS)
    await db.executemany(
        "INSERT INTO shop_orders VALUES ($1, 'CREATED')", [(i,) for i in range(1, orders + 1)]
    )


def branches(order_id: int, *, qty: int = 2, points: int = 10) -> list[Branch]:
    """The four branches of paying order ``order_id``."""
    return [
        Branch("order", f"order-{order_id}", {"order_id": order_id}),
        Branch("inventory", f"stock-{order_id}", {"qty": qty}),
        Branch("credit", f"points-{order_id}", {"member": MEMBER, "points": points}),
        Branch("wms", f"delivery-{order_id}", {"order_id": order_id}),
    ]


#: participant → op → (SQL, its arguments from the call, refused when it changes no row).
#: A delivery order is the transaction's (keyed by gid): another payment of the same
#: order has its own.
HANDLERS: dict[str, dict[Op, tuple[str, Callable[[Call], tuple[Any, ...]], bool]]] = {
    "order": {
        Op.TRY: (
            "UPDATE shop_orders SET status = 'UPDATING' WHERE id = $1 AND status = 'CREATED'",
            lambda c: (c.payload["order_id"],),
            True,
        ),
        Op.CONFIRM: (
            "UPDATE shop_orders SET status = 'PAYED' WHERE id = $1",
            lambda c: (c.payload["order_id"],),
            False,
        ),
        Op.CANCEL: (
            "UPDATE shop_orders SET status = 'CANCELED' WHERE id = $1",
            lambda c: (c.payload["order_id"],),
            False,
        ),
    },
    "inventory": {
        Op.TRY: (
            "UPDATE shop_stock SET available = available - $1, frozen = frozen + $1"
            " WHERE available >= $1",
            lambda c: (c.payload["qty"],),
            True,
        ),
        Op.CONFIRM: (
            "UPDATE shop_stock SET frozen = frozen - $1, sold = sold + $1",
            lambda c: (c.payload["qty"],),
            False,
        ),
        Op.CANCEL: (
            "UPDATE shop_stock SET frozen = frozen - $1, available = available + $1",
            lambda c: (c.payload["qty"],),
            False,
        ),
    },
    "credit": {
        Op.TRY: (
            "UPDATE shop_member SET prepared = prepared + $2 WHERE id = $1",
            lambda c: (c.payload["member"], c.payload["points"]),
            True,
        ),
        Op.CONFIRM: (
            "UPDATE shop_member SET prepared = prepared - $2, points = points + $2 WHERE id = $1",
            lambda c: (c.payload["member"], c.payload["points"]),
            False,
        ),
        Op.CANCEL: (
            "UPDATE shop_member SET prepared = prepared - $2 WHERE id = $1",
            lambda c: (c.payload["member"], c.payload["points"]),
            False,
        ),
    },
    "wms": {
        Op.TRY: (
            "INSERT INTO shop_delivery VALUES ($1, $2, 'UNKNOWN')",
            lambda c: (c.gid, c.payload["order_id"]),
            False,
        ),
        Op.CONFIRM: (
            "UPDATE shop_delivery SET status = 'CREATED' WHERE gid = $1",
            lambda c: (c.gid,),
            False,
        ),
        Op.CANCEL: (
            "UPDATE shop_delivery SET status = 'CANCELED' WHERE gid = $1",
            lambda c: (c.gid,),
            False,
        ),
    },
}


def participant(name: str, pool: asyncpg.Pool) -> Participant:
    """The participant ``name`` of the shop, its handlers registered."""
    p = Participant(pool, TOKENS[name], name=name)
    for op, (sql, args, refusable) in HANDLERS[name].items():

        async def handler(
            conn: asyncpg.Connection,
            call: Call,
            sql: str = sql,
            args: Any = args,
            r: bool = refusable,
        ) -> None:
            await conn.execute(
                "INSERT INTO shop_effects VALUES ($1, $2, $3, $4)",
                name,
                call.gid,
                call.branch,
                call.op.value,
            )
            if await conn.execute(sql, *args(call)) == "UPDATE 0" and r:
                raise Refused(f"{name}: nothing to reserve for {call.payload}")

        {Op.TRY: p.on_try, Op.CONFIRM: p.on_confirm, Op.CANCEL: p.on_cancel}[op](handler)
    return p


def ports() -> dict[str, int]:
    """A free port for each participant, chosen before the coordinator's config names it."""
    return {name: free_port() for name in TOKENS}


def participants_config(ports: dict[str, int]) -> dict[str, dict[str, Any]]:
    """The coordinator's ``[participants]`` for the shop served on ``ports``."""
    return {
        name: {"url": f"http://127.0.0.1:{port}/tcc/{name}", "token": TOKENS[name]}
        for name, port in ports.items()
    }


@asynccontextmanager
async def serving(
    pool: asyncpg.Pool,
    ports: dict[str, int],
    wrap: Callable[[str, Any], Any] = lambda name, app: app,
    *,
    only: Collection[str] = tuple(TOKENS),
) -> AsyncIterator[None]:
    """Every participant (or those named in ``only``) on its port, each a uvicorn server of
    its own; ``wrap`` may put ASGI middleware around one."""
    async with AsyncExitStack() as stack:
        for name, port in ports.items():
            if name not in only:
                continue
            app = FastAPI()
            app.include_router(participant(name, pool).router(f"/tcc/{name}"))
            await stack.enter_async_context(serving_app(wrap(name, app), port))
        yield


async def effects(db: asyncpg.Connection) -> dict[tuple[str, str], int]:
    """How many times each (participant, op) handler ran."""
    rows = await db.fetch(
        "SELECT participant, op, count(*) AS n FROM shop_effects GROUP BY participant, op"
    )
    return {(r["participant"], r["op"]): r["n"] for r in rows}


async def stock(db: asyncpg.Connection) -> tuple[int, int, int]:
    row = await db.fetchrow("SELECT available, frozen, sold FROM shop_stock")
    assert row is not None
    return row["available"], row["frozen"], row["sold"]


async def member(db: asyncpg.Connection) -> tuple[int, int]:
    row = await db.fetchrow("SELECT points, prepared FROM shop_member WHERE id = $1", MEMBER)
    assert row is not None
    return row["points"], row["prepared"]


async def barrier(db: asyncpg.Connection, gid: str) -> set[tuple[str, str, str]]:
    """The (branch, op, origin) barrier rows of ``gid``."""
    rows = await db.fetch(f"SELECT branch, op, origin FROM {BARRIER_TABLE} WHERE gid = $1", gid)
    return {(r["branch"], r["op"], r["origin"]) for r in rows}
