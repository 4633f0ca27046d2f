"""Warehouse (WMS): a paid order gets a sale delivery order (销售出库单) to ship it.

``order_id`` is deliberately not unique: the consumer's inbox, not a constraint, is what
keeps a redelivered message from creating a second delivery order, and the demo's
verdict counts them to prove it.
"""

from __future__ import annotations

from reliable_msg.sdk.consumer import Conn, Received

from .events import OrderPaid
from .group import Group

DDL = """
CREATE TABLE IF NOT EXISTS delivery_orders (
    id         bigserial   PRIMARY KEY,
    order_id   bigint      NOT NULL,
    sku        text        NOT NULL,
    qty        integer     NOT NULL CHECK (qty > 0),
    status     text        NOT NULL DEFAULT 'created',
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS delivery_orders_order ON delivery_orders (order_id);
"""


async def create_delivery_order(conn: Conn, message: Received) -> None:
    event = OrderPaid.of(message)
    await conn.execute(
        "INSERT INTO delivery_orders (order_id, sku, qty) VALUES ($1, $2, $3)",
        event.order_id,
        event.sku,
        event.qty,
    )


GROUP = Group("wms", DDL, create_delivery_order)
