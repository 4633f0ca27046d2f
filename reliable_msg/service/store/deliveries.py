"""The consumers' side: acks (the last one finishes the message), the states a repeated
ack is explained from, and redelivery of deliveries not acked in time."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from reliable_msg.message import DeliveryUpdate
from reliable_msg.service.ports import Publish, Redelivery
from reliable_msg.service.store.connection import Conn, Pooled, translated
from reliable_msg.service.store.rows import TRANSITION, as_due
from reliable_msg.states import (
    ACK,
    DELIVERY_DIED,
    FINISH,
    D,
    DeliveryStatus,
    MessageStatus,
    delivery_move,
)

#: Locks due unacked deliveries (and reads their messages) for one redelivery batch.
#: The partial index on unacked rows makes its cost that of the due rows alone.
CLAIM_DELIVERIES = """
    SELECT d.message_id, d.group_name, d.attempts, d.refusals, m.topic, m.producer,
           m.payload::text AS payload, m.headers::text AS headers, m.key, m.created_at
    FROM rmsg_delivery d JOIN rmsg_message m ON m.id = d.message_id
    WHERE d.status = $1 AND d.next_attempt_at <= now()
    ORDER BY d.next_attempt_at
    LIMIT $2
    FOR UPDATE OF d SKIP LOCKED
"""

#: Acks a group's deliveries and finishes the messages whose last delivery this was.
#: Neither move writes a history row: ``done_at`` and ``finished_at`` record them
#: (store.history).
_ACK = f"""
    WITH d AS (
        UPDATE rmsg_delivery SET status = $2, done_at = now(), updated_at = now()
        WHERE group_name = $4 AND status = $1 AND message_id = ANY($3::text[])
        RETURNING message_id
    ), m AS (
        UPDATE rmsg_message AS m
        SET remaining = m.remaining - 1, updated_at = now(),
            status = CASE WHEN {FINISH.applies()} THEN $5 ELSE m.status END,
            finished_at = CASE WHEN {FINISH.applies()} THEN now() ELSE m.finished_at END
        FROM d WHERE m.id = d.message_id
    )
    SELECT message_id FROM d
"""


class Deliveries(Pooled):
    """``rmsg_delivery``: one row per (message, consumer group)."""

    @translated
    async def ack(self, group: str, ids: Sequence[str]) -> list[str]:
        """Move the group's deliveries ``sent`` → ``done``; return the ids moved.

        A message becomes ``done`` when its last delivery is acked. Message rows are
        locked in id order first, so concurrent acks of several groups cannot deadlock;
        the lock also waits for a confirm still committing (a consumer can get the
        message before the confirm's commit), and the update that follows, a statement
        of its own, then sees the deliveries that confirm created.
        """
        src, dst = ACK.params
        async with self._tx() as conn:
            await conn.execute(
                "SELECT 1 FROM rmsg_message WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE",
                list(ids),
            )
            rows = await conn.fetch(_ACK, src, dst, list(ids), group, FINISH.dst.value)
        return [r["message_id"] for r in rows]

    @translated
    async def delivery_states(
        self, group: str, ids: Sequence[str]
    ) -> dict[str, tuple[MessageStatus, DeliveryStatus | None, datetime | None]]:
        """For each known id: the message status, this group's delivery status and when
        that delivery became done."""
        rows = await self._pool.fetch(
            """
            SELECT m.id, m.status, d.status AS delivery, d.done_at
            FROM rmsg_message m
            LEFT JOIN rmsg_delivery d ON d.message_id = m.id AND d.group_name = $2
            WHERE m.id = ANY($1::text[])
            """,
            list(ids),
            group,
        )
        return {
            r["id"]: (
                MessageStatus(r["status"]),
                DeliveryStatus(r["delivery"]) if r["delivery"] else None,
                r["done_at"],
            )
            for r in rows
        }

    @translated
    async def redeliver(self, limit: int, publish: Publish, decide: Redelivery) -> int:
        """Claim due deliveries, republish those ``decide`` does not end for want of
        attempts, and record what it decided for each.

        Rows stay locked (``FOR UPDATE SKIP LOCKED``) until the decisions are recorded,
        so no other instance handles the same delivery in the same pass. Returns the
        number of deliveries claimed.
        """
        async with self._tx() as conn:
            claimed = await conn.fetch(CLAIM_DELIVERIES, D.SENT.value, limit)
            if not claimed:
                return 0
            due = [as_due(r) for r in claimed]
            ended = [decide.exhausted(o) for o in due]
            resend = [o for o, end in zip(due, ended, strict=True) if end is None]
            errors = await publish(resend)
            updates = [end for end in ended if end is not None]
            updates += [decide.published(o, e) for o, e in zip(resend, errors, strict=True)]
            await self._record_deliveries(conn, updates)
            return len(claimed)

    async def _record_deliveries(self, conn: Conn, updates: list[DeliveryUpdate]) -> None:
        for u in updates:  # each a redelivery (sent -> sent) or exhausted (sent -> dead)
            delivery_move(D.SENT, u.status)
        # The history gets the redeliveries and the deaths, not the refused publishes.
        await conn.execute(
            f"""
            WITH d AS (
                UPDATE rmsg_delivery AS d
                SET status = u.status, attempts = u.attempts, last_error = u.last_error,
                    next_attempt_at = now() + make_interval(secs => u.next_in),
                    updated_at = now(), refusals = u.refusals
                FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::float8[],
                            $6::text[], $8::int[]) AS u(message_id, group_name, status,
                                                        attempts, next_in, last_error,
                                                        refusals)
                WHERE d.message_id = u.message_id AND d.group_name = u.group_name
                  AND d.status = $7
                RETURNING d.message_id, d.group_name, d.status, d.attempts, d.last_error
            )
            {TRANSITION}
            SELECT message_id, group_name, $7, status,
                   CASE WHEN status = $7 THEN 'redelivered, attempt ' || attempts
                        ELSE last_error END
            FROM d WHERE status <> $7 OR last_error IS NULL
            """,
            [u.message_id for u in updates],
            [u.group for u in updates],
            [u.status.value for u in updates],
            [u.attempts for u in updates],
            [u.next_in for u in updates],
            [u.last_error for u in updates],
            D.SENT.value,
            [u.refusals for u in updates],
        )
        dead = {u.message_id: u.last_error for u in updates if u.status is D.DEAD}
        if dead:
            src, dst = DELIVERY_DIED.params
            await conn.execute(
                f"""
                WITH m AS (
                    UPDATE rmsg_message AS m
                    SET status = $2, last_error = u.err, updated_at = now()
                    FROM unnest($3::text[], $4::text[]) AS u(id, err)
                    WHERE m.id = u.id AND m.status = $1
                    RETURNING m.id, m.last_error
                )
                {TRANSITION} SELECT id, NULL, $1, $2, last_error FROM m
                """,
                src,
                dst,
                list(dead),
                list(dead.values()),
            )
