"""Inventory (库存): a paid order takes its quantity from the product's available stock
and counts it as sold (the seed: available 100 -> 98, a separate field 0 -> 2)."""

from __future__ import annotations

from reliable_msg.sdk.consumer import Conn, Received

from .events import OrderPaid
from .group import BooksError, Group

DDL = """
CREATE TABLE IF NOT EXISTS products (
    sku       text    PRIMARY KEY,
    available integer NOT NULL CHECK (available >= 0),
    sold      integer NOT NULL DEFAULT 0 CHECK (sold >= 0)
);
"""


async def take_stock(conn: Conn, message: Received) -> None:
    event = OrderPaid.of(message)
    status = await conn.execute(
        "UPDATE products SET available = available - $2, sold = sold + $2"
        " WHERE sku = $1 AND available >= $2",
        event.sku,
        event.qty,
    )
    if status != "UPDATE 1":
        raise BooksError(
            f"order {event.order_id}: no product {event.sku} with {event.qty} in stock"
        )


GROUP = Group("inventory", DDL, take_stock)
