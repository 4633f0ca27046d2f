"""Requeue: an operator brings ``dead`` messages back, each to where it died from."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from reliable_msg.errors import BrokerError, Unpublishable, Unroutable
from reliable_msg.message import Message, Publication
from reliable_msg.service.ports import Publish, Requeued
from reliable_msg.service.store.connection import Conn, Pooled, translated
from reliable_msg.service.store.rows import MESSAGE_COLUMNS, TRANSITION, as_message
from reliable_msg.states import (
    REQUEUE_DELIVERY,
    REQUEUE_PENDING,
    REQUEUE_SENT,
    D,
    M,
    requeue_move,
)


class Requeues(Pooled):
    """Dead messages and their dead deliveries, brought back."""

    @translated
    async def requeue(
        self,
        *,
        ids: Sequence[str] | None,
        topic: str | None,
        group: str | None,
        limit: int,
        after: str | None = None,
        ack_timeout: float,
        publish: Publish,
    ) -> Requeued:
        """Bring back the first ``limit`` ``dead`` messages (by id, past ``after``).

        A message that died in delivery gets its dead deliveries (of ``group`` only,
        when given) a fresh budget, republished to their groups only; it goes ``dead``
        → ``sent`` once none is dead. A message that died in check-back (it never
        reached the broker) goes back to ``pending`` with a fresh check-back budget:
        only the producer knows whether it committed. Rows another transaction holds
        are waited for, not skipped: an admin's requeue must not leave one behind.
        """
        async with self._tx() as conn:
            rows = await conn.fetch(
                f"""
                SELECT {MESSAGE_COLUMNS} FROM rmsg_message m
                WHERE status = $1
                  AND ($2::text[] IS NULL OR id = ANY($2::text[]))
                  AND ($3::text IS NULL OR topic = $3)
                  AND ($4::text IS NULL OR EXISTS (
                        SELECT 1 FROM rmsg_delivery d
                        WHERE d.message_id = m.id AND d.group_name = $4 AND d.status = $5))
                  AND ($7::text IS NULL OR id > $7)
                ORDER BY id
                LIMIT $6
                FOR UPDATE
                """,
                M.DEAD.value,
                list(ids) if ids is not None else None,
                topic,
                group,
                D.DEAD.value,
                limit,
                after,
            )
            messages = [as_message(r) for r in rows]
            back = {m.id: requeue_move(m.sent_at) for m in messages}
            delivered = [m for m in messages if back[m.id] is REQUEUE_SENT]
            unchecked = [m.id for m in messages if back[m.id] is REQUEUE_PENDING]
            if unchecked:
                await conn.execute(
                    f"""
                    WITH m AS (
                        UPDATE rmsg_message SET status = $2, check_attempts = 0,
                            next_check_at = now(), last_error = NULL, updated_at = now(),
                            refusals = 0
                        WHERE id = ANY($3::text[]) AND status = $1
                        RETURNING id
                    )
                    {TRANSITION}
                    SELECT id, NULL, $1, $2, 'requeue: check-back starts again' FROM m
                    """,
                    *REQUEUE_PENDING.params,
                    unchecked,
                )
            resent, refused = await self._requeue_deliveries(
                conn, delivered, group, ack_timeout, publish
            )
            return Requeued([m.id for m in messages], resent, unchecked, refused)

    async def _requeue_deliveries(
        self,
        conn: Conn,
        messages: list[Message],
        group: str | None,
        ack_timeout: float,
        publish: Publish,
    ) -> tuple[list[str], dict[str, BrokerError]]:
        """Publish the dead deliveries (of ``group``), then move to ``sent`` only those
        the broker took: one it refused stays ``dead`` with the reason, and no row says
        ``dead`` for a copy that was published. Returns the messages touched and the
        refused ones with an error each."""
        if not messages:
            return [], {}
        dead = await conn.fetch(
            """
            SELECT message_id, group_name FROM rmsg_delivery
            WHERE message_id = ANY($1::text[]) AND status = $2
              AND ($3::text IS NULL OR group_name = $3)
            ORDER BY message_id, group_name
            """,
            [m.id for m in messages],
            D.DEAD.value,
            group,
        )
        by_id = {m.id: m for m in messages}
        outs = [
            replace(Publication.first(by_id[r["message_id"]]), group=r["group_name"]) for r in dead
        ]
        answers = list(zip(dead, await publish(outs), strict=True))
        refused = {(r["message_id"], r["group_name"]): e for r, e in answers if e is not None}
        taken = [(r["message_id"], r["group_name"]) for r, e in answers if e is None]
        rows = await self._resend_deliveries(conn, taken, ack_timeout)
        await self._keep_refused(conn, refused)
        m_src, m_dst = REQUEUE_SENT.params
        moved = await conn.fetch(
            f"""
            WITH m AS (
                UPDATE rmsg_message m SET status = $2, last_error = NULL, updated_at = now()
                WHERE id = ANY($3::text[]) AND status = $1
                  AND NOT EXISTS (SELECT 1 FROM rmsg_delivery d
                                  WHERE d.message_id = m.id AND d.status = $4)
                RETURNING id
            ), t AS (
                {TRANSITION} SELECT id, NULL, $1, $2, 'requeue' FROM m
            )
            SELECT id FROM m
            """,
            m_src,
            m_dst,
            [m.id for m in messages],
            D.DEAD.value,
        )
        touched = set(rows) | {r["id"] for r in moved}
        return [m.id for m in messages if m.id in touched], {
            id: e for (id, _), e in refused.items()
        }

    async def _resend_deliveries(
        self, conn: Conn, taken: list[tuple[str, str]], ack_timeout: float
    ) -> list[str]:
        """``dead`` → ``sent`` with a fresh budget for the (message, group) pairs the
        broker took; returns their message ids."""
        if not taken:
            return []
        d_src, d_dst = REQUEUE_DELIVERY.params
        rows = await conn.fetch(
            f"""
            WITH d AS (
                UPDATE rmsg_delivery AS d SET status = $2, attempts = 1, last_error = NULL,
                    refusals = 0, next_attempt_at = now() + make_interval(secs => $5),
                    updated_at = now()
                FROM unnest($3::text[], $4::text[]) AS u(message_id, group_name)
                WHERE d.message_id = u.message_id AND d.group_name = u.group_name
                  AND d.status = $1
                RETURNING d.message_id, d.group_name
            ), t AS (
                {TRANSITION} SELECT message_id, group_name, $1, $2, 'requeue' FROM d
            )
            SELECT message_id FROM d
            """,
            d_src,
            d_dst,
            [id for id, _ in taken],
            [g for _, g in taken],
            ack_timeout,
        )
        return [r["message_id"] for r in rows]

    async def _keep_refused(
        self, conn: Conn, refused: Mapping[tuple[str, str], BrokerError]
    ) -> None:
        """A delivery the broker refused for good (no queue, or a message it can never
        take) keeps ``dead`` with that reason, on the message too; an outage's refusal
        leaves the old reason."""
        kept = {k: e for k, e in refused.items() if isinstance(e, (Unroutable, Unpublishable))}
        if not kept:
            return
        await conn.execute(
            """
            WITH d AS (
                UPDATE rmsg_delivery AS d SET last_error = u.err, updated_at = now()
                FROM unnest($1::text[], $2::text[], $3::text[]) AS u(message_id, group_name, err)
                WHERE d.message_id = u.message_id AND d.group_name = u.group_name
                  AND d.status = $4
                RETURNING d.message_id, d.last_error
            )
            UPDATE rmsg_message AS m SET last_error = d.last_error, updated_at = now()
            FROM d WHERE m.id = d.message_id AND m.status = $5
            """,
            [id for id, _ in kept],
            [g for _, g in kept],
            [f"requeue refused by the broker: {e.message}"[:1000] for e in kept.values()],
            D.DEAD.value,
            M.DEAD.value,
        )
