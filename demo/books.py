"""The demo's books in PostgreSQL: reset and seeded before a run, read after it.

One product and one member per order, so that every order's effect can be checked
exactly: the i-th order buys ``QTY`` of product ``sku(i)`` for member ``i``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from urllib.parse import unquote, urlsplit

import asyncpg

from downstream_demo.groups import GROUPS
from upstream_demo import store as orders

#: Every product's stock before the run (the seed: 100).
STOCK = 100
#: Every member's points before the run (the seed: 1190).
POINTS = 1190
#: Items of its product each order buys (the seed: 2, so 100 -> 98).
QTY = 2
#: Price of one item.
PRICE = Decimal("49.50")


def sku(i: int) -> str:
    return f"SKU-{i:05d}"


@dataclass(frozen=True, slots=True)
class OrderRow:
    """One order with what each downstream book holds for it."""

    id: int
    status: str
    qty: int
    points: int  #: points the order earns
    available: int | None  #: its product's stock
    sold: int | None
    member_points: int | None  #: its member's points
    deliveries: int  #: sale delivery orders in the WMS for it


@dataclass(frozen=True, slots=True)
class Books:
    orders: list[OrderRow]
    inbox: dict[str, int]  #: inbox rows per group
    delivery_orders: int  #: all sale delivery orders, for any order id


async def reset(dsn: str, count: int) -> None:
    """Create the database if needed; empty the schemas; seed ``count`` products and
    members."""
    await ensure_database(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        schemas = [orders.SCHEMA, *(g.schema for g in GROUPS.values())]
        await conn.execute(f"DROP SCHEMA IF EXISTS {', '.join(schemas)} CASCADE")
        await orders.install(conn)
        for group in GROUPS.values():
            await group.install(conn)
        numbers = list(range(1, count + 1))
        await conn.execute(
            "INSERT INTO inventory.products (sku, available, sold)"
            " SELECT unnest($1::text[]), $2, 0",
            [sku(i) for i in numbers],
            STOCK,
        )
        await conn.execute(
            "INSERT INTO credit.members (id, points) SELECT unnest($1::bigint[]), $2",
            numbers,
            POINTS,
        )
    finally:
        await conn.close()


async def drop_database(dsn: str) -> None:
    """Drop the database ``dsn`` names, whoever is connected to it."""
    admin = await asyncpg.connect(_server(dsn))
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {_ident(_name(dsn))} WITH (FORCE)")
    finally:
        await admin.close()


async def read(dsn: str, groups: Sequence[str]) -> Books:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            """
            SELECT o.id, o.status, o.qty, o.points, p.available, p.sold,
                   m.points AS member_points,
                   (SELECT count(*) FROM wms.delivery_orders d WHERE d.order_id = o.id)
                       AS deliveries
            FROM orders.orders o
            LEFT JOIN inventory.products p ON p.sku = o.sku
            LEFT JOIN credit.members m ON m.id = o.member_id
            ORDER BY o.id
            """
        )
        inbox = {g: await conn.fetchval(f"SELECT count(*) FROM {g}.rmsg_inbox") for g in groups}
        delivery_orders = await conn.fetchval("SELECT count(*) FROM wms.delivery_orders")
    finally:
        await conn.close()
    return Books([OrderRow(**dict(r)) for r in rows], inbox, delivery_orders)


async def ensure_database(dsn: str) -> None:
    """Create the database ``dsn`` names unless it exists."""
    admin = await asyncpg.connect(_server(dsn))
    try:
        name = _name(dsn)
        if not await admin.fetchval("SELECT true FROM pg_database WHERE datname = $1", name):
            await admin.execute(f"CREATE DATABASE {_ident(name)}")
    finally:
        await admin.close()


def _name(dsn: str) -> str:
    return unquote(urlsplit(dsn).path.lstrip("/"))


def _server(dsn: str) -> str:
    """The same server's maintenance database."""
    return urlsplit(dsn)._replace(path="/postgres").geturl()


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
