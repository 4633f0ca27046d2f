"""Credit (积分): a paid order adds its points to the member (the seed: 1190 -> 1200)."""

from __future__ import annotations

from reliable_msg.sdk.consumer import Conn, Received

from .events import OrderPaid
from .group import BooksError, Group

DDL = """
CREATE TABLE IF NOT EXISTS members (
    id     bigint  PRIMARY KEY,
    points integer NOT NULL CHECK (points >= 0)
);
"""


async def add_points(conn: Conn, message: Received) -> None:
    event = OrderPaid.of(message)
    status = await conn.execute(
        "UPDATE members SET points = points + $2 WHERE id = $1", event.member_id, event.points
    )
    if status != "UPDATE 1":
        raise BooksError(f"order {event.order_id}: no member {event.member_id}")


GROUP = Group("credit", DDL, add_points)
