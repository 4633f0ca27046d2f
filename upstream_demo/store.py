"""The order service's tables and queries, in schema ``orders`` of the demo database."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Any

import asyncpg

from reliable_msg.sdk import producer

#: The order service's schema; its pool sets ``search_path`` to it, so the producer
#: SDK's marker table lives here too.
SCHEMA = "orders"
#: Member points earned by one paid order (the seed: 1190 -> 1200).
POINTS_PER_ORDER = 10

DDL = """
CREATE TABLE IF NOT EXISTS orders (
    id         bigserial      PRIMARY KEY,
    member_id  bigint         NOT NULL,
    sku        text           NOT NULL,
    qty        integer        NOT NULL CHECK (qty > 0),
    amount     numeric(12, 2) NOT NULL CHECK (amount >= 0),
    points     integer        NOT NULL CHECK (points >= 0),
    status     text           NOT NULL DEFAULT 'created'
                              CHECK (status IN ('created', 'paid', 'failed')),
    created_at timestamptz    NOT NULL DEFAULT now(),
    paid_at    timestamptz
);
"""

Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


class OrderStatus(StrEnum):
    CREATED = "created"  #: placed, not paid yet
    PAID = "paid"  #: paid; ``order.paid`` was sent with the same transaction
    FAILED = "failed"  #: the payment's local transaction failed; never paid


@dataclass(frozen=True, slots=True)
class Order:
    id: int
    member_id: int
    sku: str
    qty: int
    amount: Decimal
    points: int
    status: OrderStatus

    @classmethod
    def of(cls, row: asyncpg.Record) -> Order:
        return cls(
            id=row["id"],
            member_id=row["member_id"],
            sku=row["sku"],
            qty=row["qty"],
            amount=row["amount"],
            points=row["points"],
            status=OrderStatus(row["status"]),
        )

    @property
    def message_id(self) -> str:
        return message_id(self.id)

    def paid_event(self) -> dict[str, Any]:
        """The payload of ``order.paid``: what the three downstream services need."""
        return {
            "order_id": self.id,
            "member_id": self.member_id,
            "sku": self.sku,
            "qty": self.qty,
            "amount": str(self.amount),
            "points": self.points,
        }


def message_id(order_id: int) -> str:
    """The id of an order's ``order.paid`` message: one per order, so a repeated payment
    request can never send a second one."""
    return f"order-{order_id}-paid"


async def connect(dsn: str) -> asyncpg.Pool:
    """A pool whose connections work in schema ``orders``."""
    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn, min_size=1, max_size=10, server_settings={"search_path": SCHEMA}
    )
    return pool


async def install(conn: Conn) -> None:
    """Create the schema, the orders table and the producer's marker table (idempotent)."""
    async with conn.transaction():
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        await conn.execute(f"SET LOCAL search_path = {SCHEMA}")
        await conn.execute(DDL)
        await producer.install(conn)


async def create(conn: Conn, member_id: int, sku: str, qty: int, amount: Decimal) -> Order:
    row = await conn.fetchrow(
        "INSERT INTO orders (member_id, sku, qty, amount, points) VALUES ($1, $2, $3, $4, $5)"
        " RETURNING *",
        member_id,
        sku,
        qty,
        amount,
        POINTS_PER_ORDER,
    )
    assert row is not None
    return Order.of(row)


async def get(conn: Conn, id: int) -> Order | None:
    row = await conn.fetchrow("SELECT * FROM orders WHERE id = $1", id)
    return Order.of(row) if row else None


async def mark_paid(conn: Conn, id: int) -> Order | None:
    """created -> paid; None when the order is not ``created`` any more."""
    row = await conn.fetchrow(
        "UPDATE orders SET status = 'paid', paid_at = now()"
        " WHERE id = $1 AND status = 'created' RETURNING *",
        id,
    )
    return Order.of(row) if row else None


async def mark_failed(conn: Conn, id: int) -> None:
    """created -> failed, after the payment's transaction rolled back."""
    await conn.execute(
        "UPDATE orders SET status = 'failed' WHERE id = $1 AND status = 'created'", id
    )
