"""The TCC shop's books in the demo database: a schema per participant, as the seed's
services each keep their own database. One product, one member and one order per
order id, so that every order's four effects can be checked exactly.

- ``tcc_order.orders``: ``status`` CREATED → UPDATING (Try) → PAYED / CANCELED;
- ``tcc_inventory.products``: ``available`` → ``frozen`` (Try) → ``sold`` (Confirm), or
  back to ``available`` (Cancel);
- ``tcc_credit.members``: ``prepare_add_credit`` (Try) → ``points`` (Confirm), or
  cleared (Cancel);
- ``tcc_wms.sale_delivery_orders``: one per transaction, UNKNOWN (Try) → CREATED
  (Confirm) / CANCELED (Cancel).

Each schema also holds the participant's barrier table.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass

import asyncpg

from reliable_msg.sdk.tcc import BARRIER_TABLE, install

from ..books import POINTS, QTY, STOCK, ensure_database

#: Points a payed order adds (the seed: 10, so 1190 -> 1200).
CREDIT = 10
#: Participant -> its schema.
SCHEMAS = {
    "order": "tcc_order",
    "inventory": "tcc_inventory",
    "credit": "tcc_credit",
    "wms": "tcc_wms",
}
DDL = {
    "order": """
        CREATE TABLE orders (id int PRIMARY KEY, member_id int NOT NULL, sku text NOT NULL,
                             qty int NOT NULL, points int NOT NULL, status text NOT NULL)""",
    "inventory": """
        CREATE TABLE products (sku text PRIMARY KEY, available int NOT NULL,
                               frozen int NOT NULL, sold int NOT NULL)""",
    "credit": """
        CREATE TABLE members (id int PRIMARY KEY, points int NOT NULL,
                              prepare_add_credit int NOT NULL)""",
    "wms": """
        CREATE TABLE sale_delivery_orders (gid text PRIMARY KEY, order_id int NOT NULL,
                                           sku text NOT NULL, qty int NOT NULL,
                                           status text NOT NULL)""",
}


def sku(i: int) -> str:
    return f"TCC-{i:05d}"


@dataclass(frozen=True, slots=True)
class TccRow:
    """One order with what each participant's book holds for it."""

    id: int
    status: str
    available: int
    frozen: int
    sold: int
    points: int
    prepare_add_credit: int
    deliveries: dict[str, int]  #: its sale delivery orders by status


@dataclass(frozen=True, slots=True)
class TccBooks:
    orders: list[TccRow]
    #: (participant, branch) -> origin of its ``try`` barrier row ('try' or 'cancel')
    try_origins: dict[tuple[str, str], str]


async def reset(dsn: str, count: int, *, sold_out: Collection[int] = ()) -> None:
    """Empty the four schemas; seed orders 1..``count`` CREATED, each with its product
    (``STOCK`` available, or sold out: 0 available, ``STOCK`` sold) and its member
    (``POINTS``). Creates the database if needed."""
    await ensure_database(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {', '.join(SCHEMAS.values())} CASCADE")
        for name, schema in SCHEMAS.items():
            async with conn.transaction():
                await conn.execute(f"CREATE SCHEMA {schema}")
                await conn.execute(f"SET LOCAL search_path = {schema}")
                await conn.execute(DDL[name])
                await install(conn)
        ids = list(range(1, count + 1))
        await conn.execute(
            "INSERT INTO tcc_order.orders SELECT i, i, 'TCC-' || lpad(i::text, 5, '0'), $2, $3,"
            " 'CREATED' FROM unnest($1::int[]) AS i",
            ids,
            QTY,
            CREDIT,
        )
        await conn.executemany(
            "INSERT INTO tcc_inventory.products VALUES ($1, $2, 0, $3)",
            [(sku(i), 0, STOCK) if i in sold_out else (sku(i), STOCK, 0) for i in ids],
        )
        await conn.execute(
            "INSERT INTO tcc_credit.members SELECT i, $2, 0 FROM unnest($1::int[]) AS i",
            ids,
            POINTS,
        )
    finally:
        await conn.close()


async def read(dsn: str) -> TccBooks:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            """
            SELECT o.id, o.status, p.available, p.frozen, p.sold, m.points,
                   m.prepare_add_credit,
                   (SELECT coalesce(jsonb_object_agg(s.status, s.n), '{}')::text FROM (
                        SELECT status, count(*) AS n FROM tcc_wms.sale_delivery_orders d
                        WHERE d.order_id = o.id GROUP BY status) s) AS deliveries
            FROM tcc_order.orders o
            JOIN tcc_inventory.products p ON p.sku = o.sku
            JOIN tcc_credit.members m ON m.id = o.member_id
            ORDER BY o.id
            """
        )
        origins: dict[tuple[str, str], str] = {}
        for name, schema in SCHEMAS.items():
            for r in await conn.fetch(
                f"SELECT branch, origin FROM {schema}.{BARRIER_TABLE} WHERE op = 'try'"
            ):
                origins[(name, r["branch"])] = r["origin"]
    finally:
        await conn.close()
    return TccBooks(
        [TccRow(**(dict(r) | {"deliveries": _json(r["deliveries"])})) for r in rows], origins
    )


def _json(text: str) -> dict[str, int]:
    return {str(k): int(v) for k, v in json.loads(text).items()}
