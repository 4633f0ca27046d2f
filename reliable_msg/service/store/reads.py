"""What operators and the API read: messages (one with its deliveries, or a page),
counts, and a message's history."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from reliable_msg.message import Message, Transition
from reliable_msg.service.ports import Page
from reliable_msg.service.store.connection import Conn, Pooled, translated
from reliable_msg.service.store.history import merged
from reliable_msg.service.store.rows import MESSAGE_COLUMNS, as_delivery, as_message
from reliable_msg.states import MessageStatus


class Reads(Pooled):
    """Reads only: no move is made here."""

    @translated
    async def get_many(self, ids: Sequence[str]) -> list[Message]:
        rows = await self._pool.fetch(
            f"SELECT {MESSAGE_COLUMNS} FROM rmsg_message WHERE id = ANY($1::text[])", list(ids)
        )
        return [as_message(r) for r in rows]

    @translated
    async def get(self, id: str) -> Message | None:
        async with self._pool.acquire() as conn:
            return await _message(conn, id)

    @translated
    async def page(
        self,
        *,
        status: MessageStatus | None,
        topic: str | None,
        group: str | None,
        limit: int,
        after: tuple[datetime, str] | None,
    ) -> Page:
        """Messages oldest first, keyset-paginated on (created_at, id)."""
        after_at, after_id = after if after else (None, None)
        rows = await self._pool.fetch(
            f"""
            SELECT {MESSAGE_COLUMNS} FROM rmsg_message m
            WHERE ($1::text IS NULL OR status = $1)
              AND ($2::text IS NULL OR topic = $2)
              AND ($3::text IS NULL OR EXISTS (
                    SELECT 1 FROM rmsg_delivery d
                    WHERE d.message_id = m.id AND d.group_name = $3))
              AND ($4::timestamptz IS NULL OR (created_at, id) > ($4, $5::text))
            ORDER BY created_at, id
            LIMIT $6
            """,
            status.value if status else None,
            topic,
            group,
            after_at,
            after_id,
            limit + 1,
        )
        messages = [as_message(r) for r in rows[:limit]]
        more = len(rows) > limit
        cursor = (messages[-1].created_at, messages[-1].id) if more and messages else None
        return Page(messages, cursor)

    @translated
    async def stats(self) -> dict[str, Any]:
        async with self._pool.acquire() as conn:
            by_status = await conn.fetch(
                "SELECT status, count(*) AS n FROM rmsg_message GROUP BY status"
            )
            by_topic = await conn.fetch(
                "SELECT topic, status, count(*) AS n FROM rmsg_message GROUP BY topic, status"
            )
            by_group = await conn.fetch(
                "SELECT group_name, status, count(*) AS n FROM rmsg_delivery"
                " GROUP BY group_name, status"
            )
        topics: dict[str, dict[str, int]] = {}
        for r in by_topic:
            topics.setdefault(r["topic"], {})[r["status"]] = r["n"]
        groups: dict[str, dict[str, int]] = {}
        for r in by_group:
            groups.setdefault(r["group_name"], {})[r["status"]] = r["n"]
        return {
            "messages": {r["status"]: r["n"] for r in by_status},
            "topics": topics,
            "groups": groups,
        }

    @translated
    async def history(self, id: str) -> list[Transition]:
        """Every move of message ``id`` and of its deliveries, oldest first: the rows of
        ``rmsg_transition`` and the moves the message's rows record (see
        :mod:`~reliable_msg.service.store.history`), read from one snapshot."""
        async with (
            self._pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            message = await _message(conn, id)
            if message is None:
                return []
            rows = await conn.fetch(
                """
                SELECT group_name, from_status, to_status, at, reason FROM rmsg_transition
                WHERE message_id = $1 ORDER BY seq
                """,
                id,
            )
        return merged([Transition(**dict(r)) for r in rows], message)


async def _message(conn: Conn, id: str) -> Message | None:
    """Message ``id`` with its deliveries."""
    row = await conn.fetchrow(f"SELECT {MESSAGE_COLUMNS} FROM rmsg_message WHERE id = $1", id)
    if row is None:
        return None
    deliveries = await conn.fetch(
        """
        SELECT group_name, status, attempts, next_attempt_at, last_error, updated_at, done_at
        FROM rmsg_delivery WHERE message_id = $1 ORDER BY group_name
        """,
        id,
    )
    return as_message(row, tuple(as_delivery(d) for d in deliveries))
