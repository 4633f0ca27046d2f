"""The producer's moves: prepare (insert), confirm (publish in the transaction), the
count of refused publishes, and cancel."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from reliable_msg.errors import BrokerError, ReliableMsgError
from reliable_msg.message import Message, NewMessage, Publication
from reliable_msg.service.ports import Confirmed, Publish
from reliable_msg.service.store.connection import Conn, Pooled, translated
from reliable_msg.service.store.rows import MESSAGE_COLUMNS, TRANSITION, as_message
from reliable_msg.states import CANCEL, CONFIRM, GIVE_UP, D, M

#: ``pending`` → ``sent`` for the ids in $3 (of producer $4 when not NULL), creating
#: their deliveries; the statements below return the messages moved.
_SENT = f"""
    WITH m AS (
        UPDATE rmsg_message
        SET status = $2, remaining = cardinality(groups), sent_at = now(),
            updated_at = now(), next_check_at = NULL, last_error = NULL
        WHERE id = ANY($3::text[]) AND status = $1
          AND ($4::text IS NULL OR producer = $4)
        RETURNING {MESSAGE_COLUMNS}
    ), d AS (
        INSERT INTO rmsg_delivery (message_id, group_name, status, next_attempt_at)
        SELECT m.id, g, $5, now() + make_interval(secs => $6)
        FROM m, unnest(m.groups) AS g
    )
"""

#: The producer's confirm: the history has it from ``sent_at`` (store.history).
_MARK_SENT = f"{_SENT} SELECT * FROM m"

#: Check-back's confirm: a row of its own, for the reason ``sent_at`` cannot tell.
_MARK_SENT_CHECKED = f"""
    {_SENT}, t AS ({TRANSITION} SELECT m.id, NULL, $1, $2, 'check-back: committed' FROM m)
    SELECT * FROM m
"""


class _Refused(ReliableMsgError):
    """The broker did not take the message: roll its confirm back (never leaves the
    store: the confirm answers ``error`` for the message)."""

    def __init__(self, error: BrokerError) -> None:
        super().__init__(error.message)
        self.error = error


class Messages(Pooled):
    """``rmsg_message`` as the producer moves it."""

    @translated
    async def insert(
        self, producer: str, items: Sequence[tuple[NewMessage, Sequence[str]]], check_in: float
    ) -> tuple[list[Message], list[tuple[Message, bool]]]:
        """Insert new ``pending`` messages; return (inserted, already existing by id, each
        with whether the request repeats it exactly). An id in neither was used by a
        message purged since: ids are never reused."""
        # The id is claimed in rmsg_used_id first: its unique index, not a snapshot's
        # read, decides between this prepare, a concurrent one and the purge.
        rows = await self._pool.fetch(
            f"""
            WITH claimed AS (
                INSERT INTO rmsg_used_id (id, producer)
                SELECT c.id, $1 FROM unnest($4::text[]) AS c(id)
                ON CONFLICT (id) DO NOTHING
                RETURNING id
            ), m AS (
                INSERT INTO rmsg_message
                    (id, topic, producer, payload, headers, key, status, groups, next_check_at)
                SELECT u.id, u.topic, $1, u.payload::jsonb, u.headers::jsonb, u.key, $2,
                       string_to_array(u.groups, ','), now() + make_interval(secs => $3)
                FROM unnest($4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
                            $9::text[]) AS u(id, topic, payload, headers, key, groups)
                JOIN claimed USING (id)
                ON CONFLICT (id) DO NOTHING
                RETURNING {MESSAGE_COLUMNS}
            )
            SELECT * FROM m
            """,
            producer,
            M.PENDING.value,
            check_in,
            [m.id for m, _ in items],
            [m.topic for m, _ in items],
            [m.payload for m, _ in items],
            [json.dumps(m.headers) for m, _ in items],
            [m.key for m, _ in items],
            [",".join(groups) for _, groups in items],
        )
        inserted = [as_message(r) for r in rows]
        fresh = {m.id for m in inserted}
        others = [m for m, _ in items if m.id not in fresh]
        existing = await self._repeats(producer, others) if others else []
        return inserted, existing

    async def _repeats(
        self, producer: str, requests: Sequence[NewMessage]
    ) -> list[tuple[Message, bool]]:
        """The stored messages with these ids, each with whether its request is the very
        same: owner, topic, key, and payload and headers as canonical JSON. The request
        goes through jsonb as the stored one did, so their texts compare type-exact
        (1, true and 1.0 differ) whatever the key order or number spelling."""
        rows = await self._pool.fetch(
            f"""
            SELECT {MESSAGE_COLUMNS}, same FROM (
                SELECT m.*,
                       m.producer = $1 AND m.topic = u.topic
                       AND m.key IS NOT DISTINCT FROM u.key
                       AND m.payload::text = u.payload::jsonb::text
                       AND m.headers::text = u.headers::jsonb::text AS same
                FROM rmsg_message m
                JOIN unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
                     AS u(id, topic, payload, headers, key) ON u.id = m.id
            ) AS m
            """,
            producer,
            [m.id for m in requests],
            [m.topic for m in requests],
            [m.payload for m in requests],
            [json.dumps(m.headers) for m in requests],
            [m.key for m in requests],
        )
        return [(as_message(r), bool(r["same"])) for r in rows]

    # -- confirm / cancel ------------------------------------------------------------

    @translated
    async def confirm(
        self, ids: Sequence[str], producer: str | None, ack_timeout: float, publish: Publish
    ) -> Confirmed:
        """Move ``pending`` → ``sent`` and publish, in one transaction.

        The rows are updated, ``publish`` is awaited with the rows locked, and the
        transaction commits only what the broker took: a refused message stays
        ``pending``, and is returned with the broker's error.
        """
        if len(ids) == 1:
            return await self._confirm_one(ids[0], producer, ack_timeout, publish)
        async with self._tx() as conn:
            savepoint = conn.transaction()
            await savepoint.start()
            sent = await self._mark_sent(conn, ids, producer, ack_timeout)
            refused = await _publish_first(publish, sent)
            if not refused:
                await savepoint.commit()
                return Confirmed(sent, {})
            await savepoint.rollback()
            taken = [m.id for m in sent if m.id not in refused]
            sent = await self._mark_sent(conn, taken, producer, ack_timeout) if taken else []
            return Confirmed(sent, refused)

    async def _confirm_one(
        self, id: str, producer: str | None, ack_timeout: float, publish: Publish
    ) -> Confirmed:
        """:meth:`confirm` of one message. Taken or refused as a whole, it needs no
        savepoint: a refusal rolls the transaction back (two round trips fewer on the
        single-message API's path)."""
        try:
            async with self._tx() as conn:
                sent = await self._mark_sent(conn, [id], producer, ack_timeout)
                refused = await _publish_first(publish, sent)
                if refused:
                    raise _Refused(refused[id])
                return Confirmed(sent, {})
        except _Refused as refusal:
            return Confirmed([], {id: refusal.error})

    async def _mark_sent(
        self, conn: Conn, ids: Sequence[str], producer: str | None, ack: float
    ) -> list[Message]:
        src, dst = CONFIRM.params
        # The producer's confirm is in the history by sent_at; check-back's has a row.
        sql = _MARK_SENT if producer is not None else _MARK_SENT_CHECKED
        rows = await conn.fetch(sql, src, dst, list(ids), producer, D.SENT.value, ack)
        return [as_message(r) for r in rows]

    @translated
    async def publish_refused(self, refused: Mapping[str, tuple[str, int]]) -> list[str]:
        """Count one refused publish of each ``pending`` message in ``refused`` (id →
        the broker's error, and the refusals that make it dead). A message refused that
        many times goes ``dead`` with the error; returns those ids."""
        src, dst = GIVE_UP.params
        rows = await self._pool.fetch(
            f"""
            WITH m AS (
                UPDATE rmsg_message AS m
                SET refusals = m.refusals + 1, updated_at = now(),
                    status = CASE WHEN m.refusals + 1 >= u.lim THEN $2 ELSE m.status END,
                    next_check_at = CASE WHEN m.refusals + 1 >= u.lim THEN NULL
                                         ELSE m.next_check_at END,
                    last_error = CASE WHEN u.lim = 1 OR m.refusals + 1 < u.lim THEN u.err
                        ELSE format('the broker refused it %s times; last: %s',
                                    m.refusals + 1, u.err) END
                FROM unnest($3::text[], $4::text[], $5::int[]) AS u(id, err, lim)
                WHERE m.id = u.id AND m.status = $1
                RETURNING m.id, m.status, m.last_error
            ), t AS (
                {TRANSITION} SELECT id, NULL, $1, $2, last_error FROM m WHERE status = $2
            )
            SELECT id FROM m WHERE status = $2
            """,
            src,
            dst,
            list(refused),
            [error[:1000] for error, _ in refused.values()],
            [limit for _, limit in refused.values()],
        )
        return [r["id"] for r in rows]

    @translated
    async def cancel(self, ids: Sequence[str], producer: str | None) -> list[str]:
        """Move ``pending`` → ``cancelled``; return the ids moved."""
        src, dst = CANCEL.params
        rows = await self._pool.fetch(
            f"""
            WITH m AS (
                UPDATE rmsg_message
                SET status = $2, finished_at = now(), updated_at = now(), next_check_at = NULL
                WHERE id = ANY($3::text[]) AND status = $1
                  AND ($4::text IS NULL OR producer = $4)
                RETURNING id
            ), t AS (
                {TRANSITION}
                SELECT id, NULL, $1, $2,
                       CASE WHEN $4::text IS NULL THEN 'check-back: rolled back' ELSE 'cancel' END
                FROM m
            )
            SELECT id FROM m
            """,
            src,
            dst,
            list(ids),
            producer,
        )
        return [r["id"] for r in rows]


async def _publish_first(publish: Publish, sent: list[Message]) -> dict[str, BrokerError]:
    """The first publish of confirmed messages; returns those not taken, with why."""
    if not sent:
        return {}
    outs = [Publication.first(m) for m in sent]
    errors = await publish(outs)
    return {o.id: e for o, e in zip(outs, errors, strict=True) if e is not None}
