"""What a consumer group is made of: its schema, its tables and its handler."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from reliable_msg.sdk import consumer
from reliable_msg.sdk.consumer import Conn, Received


class BooksError(RuntimeError):
    """A message the books cannot take (unknown product or member, no stock). The
    handler's transaction rolls back and the service redelivers the message."""


@dataclass(frozen=True, slots=True)
class Group:
    name: str  #: the consumer group, and the schema of its books
    ddl: str  #: its tables (CREATE ... IF NOT EXISTS)
    handler: Callable[[Conn, Received], Awaitable[None]]  #: its ``order.paid`` handler

    @property
    def schema(self) -> str:
        return self.name

    async def install(self, conn: Conn) -> None:
        """Create the schema, the group's tables and the SDK's inbox (idempotent)."""
        async with conn.transaction():
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
            await conn.execute(f"SET LOCAL search_path = {self.schema}")
            await conn.execute(self.ddl)
            await consumer.install(conn)
