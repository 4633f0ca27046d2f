"""The PostgreSQL store: every SQL statement of the service lives here.

State moves are guarded updates built from :mod:`reliable_msg.states`. The two moves that
must publish inside the database transaction (confirm, redelivery) take the publish as
a callback, so the transaction stays here and the broker policy stays in the service.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, ParamSpec, TypeVar

import asyncpg
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
)

from reliable_msg.errors import BrokerError, StoreError, Unpublishable, Unroutable
from reliable_msg.message import (
    Delivery,
    DeliveryUpdate,
    DueCheck,
    Message,
    NewMessage,
    Outgoing,
    Transition,
)
from reliable_msg.states import D, DeliveryStatus, M, MessageStatus, delivery_move, message_move

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

_MESSAGE_COLUMNS = """
    id, topic, producer, payload::text AS payload, headers::text AS headers, key, status,
    groups, check_attempts, next_check_at, last_error, created_at, updated_at, sent_at,
    finished_at, refusals
"""

#: Claims due pending messages for check-back by pushing their next check past a lease,
#: skipping the producers named in $4 (those with no free call slot).
#: The partial index on pending rows makes its cost that of the due rows alone.
CLAIM_CHECKS = """
    UPDATE rmsg_message SET next_check_at = now() + make_interval(secs => $3)
    WHERE id IN (
        SELECT id FROM rmsg_message
        WHERE status = $1 AND next_check_at <= now() AND producer <> ALL($4::text[])
        ORDER BY next_check_at
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    ) AND status = $1
    RETURNING id, topic, producer, created_at, check_attempts
"""

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

#: Head of the statement that records moves in the history, in the same statement as
#: the move itself (as a CTE), so the history never disagrees with the state.
_TRANSITION = """
    INSERT INTO rmsg_transition (message_id, group_name, from_status, to_status, reason)
"""

#: Acks a group's deliveries and finishes messages whose last delivery this was.
_ACK = f"""
    WITH d AS (
        UPDATE rmsg_delivery SET status = $2, done_at = now(), updated_at = now()
        WHERE group_name = $4 AND status = $1 AND message_id = ANY($3::text[])
        RETURNING message_id
    ), m AS (
        UPDATE rmsg_message AS m
        SET remaining = m.remaining - 1, updated_at = now(),
            status = CASE WHEN m.remaining = 1 AND m.status = $5 THEN $6 ELSE m.status END,
            finished_at = CASE WHEN m.remaining = 1 AND m.status = $5 THEN now()
                               ELSE m.finished_at END
        FROM d WHERE m.id = d.message_id
        RETURNING m.id, m.status
    ), t AS (
        {_TRANSITION}
        SELECT message_id, $4, $1, $2, 'ack' FROM d
        UNION ALL
        SELECT id, NULL, $5, $6, 'last delivery acked' FROM m WHERE status = $6
    )
    SELECT message_id FROM d
"""

#: PostgreSQL errors worth one more try of the same short transaction.
_RETRYABLE = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
#: What says PostgreSQL is out of reach rather than that we sent bad SQL.
_UNAVAILABLE = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.AdminShutdownError,
    asyncpg.TooManyConnectionsError,
    asyncpg.QueryCanceledError,
    # A pooled connection the server terminated while it sat idle, picked up before its
    # end of stream was read: "cannot switch to state ...; another operation is in
    # progress". The connection is closed right after; the next call gets a new one.
    asyncpg.InternalClientError,
    TimeoutError,
)

#: A connection from the pool (asyncpg hands out proxies).
Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

PublishMany = Callable[[list[Outgoing]], Awaitable[dict[str, BrokerError]]]
"""Publishes messages; returns the ids the broker did not take, with the error."""


def _translated(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Turn a lost database into :class:`StoreError`; retry deadlocks a few times."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        for attempt in range(1, 4):
            try:
                return await fn(*args, **kwargs)
            except _RETRYABLE:
                if attempt == 3:
                    raise
                log.debug("retrying %s after a deadlock", fn.__name__)
            except _UNAVAILABLE as exc:
                raise StoreError(f"PostgreSQL unavailable: {exc}") from exc
        raise AssertionError("unreachable")

    return wrapper


class _Refused(Exception):
    """The broker did not take the message: roll its confirm back."""


@dataclass(frozen=True, slots=True)
class Owned:
    """Who owns a message and where it stands; used to explain a refused move."""

    id: str
    producer: str
    status: MessageStatus


@dataclass(frozen=True, slots=True)
class Requeued:
    """What one requeue call did."""

    selected: list[str]  #: the dead messages it took, in id order
    resent: list[str]  #: of them, those with dead deliveries republished (or now ``sent``)
    rechecked: list[str]  #: of them, those back to ``pending`` for check-back
    #: of them, those with a delivery the broker refused (it stays ``dead``), and why
    refused: dict[str, BrokerError] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Page:
    messages: list[Message]
    next_cursor: tuple[datetime, str] | None


class PgStore:
    """Messages and deliveries in PostgreSQL, through an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def connect(cls, dsn: str, *, pool_size: int = 20, wait: float = 0.0) -> PgStore:
        """Open the pool; with ``wait``, keep trying that long while PostgreSQL does not
        answer (a server restarting, or starting with the service)."""
        retrying = AsyncRetrying(
            retry=retry_if_exception(_unreachable),
            stop=stop_after_delay(wait),
            wait=wait_exponential(multiplier=0.2, max=2.0),
            before_sleep=_log_waiting,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await cls._connect(dsn, pool_size)
        raise AssertionError("unreachable")

    @classmethod
    async def _connect(cls, dsn: str, pool_size: int) -> PgStore:
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min(2, pool_size),
                max_size=pool_size,
                reset=_keep_session,
                server_settings={
                    "application_name": "reliable-msg",
                    "statement_timeout": "30s",
                    "idle_in_transaction_session_timeout": "60s",
                },
            )
        except (*_UNAVAILABLE, asyncpg.PostgresError) as exc:
            raise StoreError(f"cannot connect to PostgreSQL: {exc}") from exc
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[Conn]:
        async with self._pool.acquire() as conn, conn.transaction():
            yield conn

    @_translated
    async def ping(self) -> None:
        async with self._pool.acquire() as conn:
            await conn.fetchval("SELECT 1")

    # -- prepare ---------------------------------------------------------------------

    @_translated
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
                RETURNING {_MESSAGE_COLUMNS}
            ), t AS (
                {_TRANSITION} SELECT id, NULL, NULL, $2, 'prepare' FROM m
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
        inserted = [_message(r) for r in rows]
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
            SELECT {_MESSAGE_COLUMNS}, same FROM (
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
        return [(_message(r), bool(r["same"])) for r in rows]

    # -- confirm / cancel ------------------------------------------------------------

    @_translated
    async def confirm(
        self, ids: Sequence[str], producer: str | None, ack_timeout: float, publish: PublishMany
    ) -> list[Message]:
        """Move ``pending`` → ``sent`` and publish, in one transaction.

        The rows are updated, ``publish`` is awaited with the rows locked, and the
        transaction commits only what the broker took: a refused message stays
        ``pending``. Returns the messages now ``sent``.
        """
        if len(ids) == 1:
            return await self._confirm_one(ids[0], producer, ack_timeout, publish)
        async with self._tx() as conn:
            savepoint = conn.transaction()
            await savepoint.start()
            sent = await self._mark_sent(conn, ids, producer, ack_timeout)
            if not sent:
                await savepoint.commit()
                return []
            refused = await publish([Outgoing.first(m) for m in sent])
            if not refused:
                await savepoint.commit()
                return sent
            await savepoint.rollback()
            taken = [m.id for m in sent if m.id not in refused]
            return await self._mark_sent(conn, taken, producer, ack_timeout) if taken else []

    async def _confirm_one(
        self, id: str, producer: str | None, ack_timeout: float, publish: PublishMany
    ) -> list[Message]:
        """:meth:`confirm` of one message. Taken or refused as a whole, it needs no
        savepoint: a refusal rolls the transaction back (two round trips fewer on the
        single-message API's path)."""
        try:
            async with self._tx() as conn:
                sent = await self._mark_sent(conn, [id], producer, ack_timeout)
                if sent and await publish([Outgoing.first(sent[0])]):
                    raise _Refused
                return sent
        except _Refused:
            return []

    async def _mark_sent(
        self, conn: Conn, ids: Sequence[str], producer: str | None, ack: float
    ) -> list[Message]:
        src, dst = message_move(M.PENDING, M.SENT)
        rows = await conn.fetch(
            f"""
            WITH m AS (
                UPDATE rmsg_message
                SET status = $2, remaining = cardinality(groups), sent_at = now(),
                    updated_at = now(), next_check_at = NULL, last_error = NULL
                WHERE id = ANY($3::text[]) AND status = $1
                  AND ($4::text IS NULL OR producer = $4)
                RETURNING {_MESSAGE_COLUMNS}
            ), d AS (
                INSERT INTO rmsg_delivery (message_id, group_name, status, next_attempt_at)
                SELECT m.id, g, $5, now() + make_interval(secs => $6)
                FROM m, unnest(m.groups) AS g
            ), t AS (
                {_TRANSITION}
                SELECT m.id, NULL, $1, $2,
                       CASE WHEN $4::text IS NULL THEN 'check-back: committed' ELSE 'confirm' END
                FROM m
            )
            SELECT * FROM m
            """,
            src,
            dst,
            list(ids),
            producer,
            D.SENT.value,
            ack,
        )
        return [_message(r) for r in rows]

    @_translated
    async def publish_refused(self, refused: Mapping[str, tuple[str, int]]) -> list[str]:
        """Count one refused publish of each ``pending`` message in ``refused`` (id →
        the broker's error, and the refusals that make it dead). A message refused that
        many times goes ``dead`` with the error; returns those ids."""
        src, dst = message_move(M.PENDING, M.DEAD)
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
                {_TRANSITION} SELECT id, NULL, $1, $2, last_error FROM m WHERE status = $2
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

    @_translated
    async def cancel(self, ids: Sequence[str], producer: str | None) -> list[str]:
        """Move ``pending`` → ``cancelled``; return the ids moved."""
        src, dst = message_move(M.PENDING, M.CANCELLED)
        rows = await self._pool.fetch(
            f"""
            WITH m AS (
                UPDATE rmsg_message
                SET status = $2, finished_at = now(), updated_at = now(), next_check_at = NULL
                WHERE id = ANY($3::text[]) AND status = $1
                  AND ($4::text IS NULL OR producer = $4)
                RETURNING id
            ), t AS (
                {_TRANSITION}
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

    @_translated
    async def owners(self, ids: Sequence[str]) -> dict[str, Owned]:
        rows = await self._pool.fetch(
            "SELECT id, producer, status FROM rmsg_message WHERE id = ANY($1::text[])", list(ids)
        )
        return {r["id"]: Owned(r["id"], r["producer"], MessageStatus(r["status"])) for r in rows}

    # -- ack -------------------------------------------------------------------------

    @_translated
    async def ack(self, group: str, ids: Sequence[str]) -> list[str]:
        """Move the group's deliveries ``sent`` → ``done``; return the ids moved.

        A message becomes ``done`` when its last delivery is acked. Message rows are
        locked in id order first, so concurrent acks of several groups cannot deadlock;
        the lock also waits for a confirm still committing (a consumer can get the
        message before the confirm's commit), and the update that follows, a statement
        of its own, then sees the deliveries that confirm created.
        """
        src, dst = delivery_move(D.SENT, D.DONE)
        msg_src, msg_dst = message_move(M.SENT, M.DONE)
        async with self._tx() as conn:
            await conn.execute(
                "SELECT 1 FROM rmsg_message WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE",
                list(ids),
            )
            rows = await conn.fetch(_ACK, src, dst, list(ids), group, msg_src, msg_dst)
        return [r["message_id"] for r in rows]

    @_translated
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

    # -- reads -----------------------------------------------------------------------

    @_translated
    async def get_many(self, ids: Sequence[str]) -> list[Message]:
        rows = await self._pool.fetch(
            f"SELECT {_MESSAGE_COLUMNS} FROM rmsg_message WHERE id = ANY($1::text[])", list(ids)
        )
        return [_message(r) for r in rows]

    @_translated
    async def get(self, id: str) -> Message | None:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                f"SELECT {_MESSAGE_COLUMNS} FROM rmsg_message WHERE id = $1", id
            )
            if row is None:
                return None
            deliveries = await conn.fetch(
                """
                SELECT group_name, status, attempts, next_attempt_at, last_error,
                       updated_at, done_at
                FROM rmsg_delivery WHERE message_id = $1 ORDER BY group_name
                """,
                id,
            )
        return _message(row, tuple(_delivery(d) for d in deliveries))

    @_translated
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
            SELECT {_MESSAGE_COLUMNS} FROM rmsg_message m
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
        messages = [_message(r) for r in rows[:limit]]
        more = len(rows) > limit
        cursor = (messages[-1].created_at, messages[-1].id) if more and messages else None
        return Page(messages, cursor)

    @_translated
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

    # -- check-back ------------------------------------------------------------------

    @_translated
    async def claim_checks(
        self, limit: int, lease: float, skip: Sequence[str] = ()
    ) -> list[DueCheck]:
        """Claim due ``pending`` messages, none of producers in ``skip``, by hiding them
        for ``lease`` seconds."""
        rows = await self._pool.fetch(CLAIM_CHECKS, M.PENDING.value, limit, lease, list(skip))
        return [DueCheck(**dict(r)) for r in rows]

    @_translated
    async def release_checks(self, ids: Sequence[str]) -> None:
        """Give claimed messages back before their lease ends: due again at once."""
        await self._pool.execute(
            "UPDATE rmsg_message SET next_check_at = now() WHERE id = ANY($1) AND status = $2",
            list(ids),
            M.PENDING.value,
        )

    @_translated
    async def check_failed(self, check: DueCheck, error: str, retry_in: float | None) -> bool:
        """Count a check-back that gave no answer; ``retry_in=None`` makes it dead."""
        if retry_in is None:
            src, dst = message_move(M.PENDING, M.DEAD)
        else:
            src = dst = M.PENDING.value
        moved = await self._pool.fetchval(
            f"""
            WITH m AS (
                UPDATE rmsg_message
                SET check_attempts = check_attempts + 1, last_error = $4, updated_at = now(),
                    status = $2,
                    next_check_at = CASE WHEN $5::float8 IS NULL THEN NULL
                                         ELSE now() + make_interval(secs => $5) END
                WHERE id = $3 AND status = $1 AND check_attempts = $6
                RETURNING id
            ), t AS (
                {_TRANSITION}
                SELECT id, NULL, $1, $2, 'check-back exhausted: ' || $4 FROM m WHERE $1 <> $2
            )
            SELECT count(*) FROM m
            """,
            src,
            dst,
            check.id,
            error[:1000],
            retry_in,
            check.check_attempts,
        )
        return bool(moved == 1)

    # -- redelivery ------------------------------------------------------------------

    @_translated
    async def redeliver(
        self,
        limit: int,
        decide: Callable[[list[Outgoing]], Awaitable[list[DeliveryUpdate]]],
    ) -> int:
        """Claim due deliveries, let ``decide`` publish them, record what it decided.

        Rows stay locked (``FOR UPDATE SKIP LOCKED``) until the decisions are recorded,
        so no other instance handles the same delivery in the same pass. Returns the
        number of deliveries claimed.
        """
        async with self._tx() as conn:
            rows = await conn.fetch(
                CLAIM_DELIVERIES,
                D.SENT.value,
                limit,
            )
            if not rows:
                return 0
            due = [_due_delivery(r) for r in rows]
            updates = await decide(due)
            await self._record_deliveries(conn, updates)
            return len(rows)

    async def _record_deliveries(self, conn: Conn, updates: list[DeliveryUpdate]) -> None:
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
            {_TRANSITION}
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
            src, dst = message_move(M.SENT, M.DEAD)
            await conn.execute(
                f"""
                WITH m AS (
                    UPDATE rmsg_message AS m
                    SET status = $2, last_error = u.err, updated_at = now()
                    FROM unnest($3::text[], $4::text[]) AS u(id, err)
                    WHERE m.id = u.id AND m.status = $1
                    RETURNING m.id, m.last_error
                )
                {_TRANSITION} SELECT id, NULL, $1, $2, last_error FROM m
                """,
                src,
                dst,
                list(dead),
                list(dead.values()),
            )

    # -- requeue ---------------------------------------------------------------------

    @_translated
    async def requeue(
        self,
        *,
        ids: Sequence[str] | None,
        topic: str | None,
        group: str | None,
        limit: int,
        after: str | None = None,
        ack_timeout: float,
        publish: PublishMany,
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
                SELECT {_MESSAGE_COLUMNS} FROM rmsg_message m
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
            messages = [_message(r) for r in rows]
            delivered = [m for m in messages if m.sent_at is not None]
            unchecked = [m.id for m in messages if m.sent_at is None]
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
                    {_TRANSITION}
                    SELECT id, NULL, $1, $2, 'requeue: check-back starts again' FROM m
                    """,
                    *message_move(M.DEAD, M.PENDING),
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
        publish: PublishMany,
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
        refused = await _publish_per_group(
            publish,
            [_replace_group(Outgoing.first(by_id[r["message_id"]]), r["group_name"]) for r in dead],
        )
        taken = [
            (r["message_id"], r["group_name"])
            for r in dead
            if (r["message_id"], r["group_name"]) not in refused
        ]
        rows = await self._resend_deliveries(conn, taken, ack_timeout)
        await self._keep_refused(conn, refused)
        m_src, m_dst = message_move(M.DEAD, M.SENT)
        moved = await conn.fetch(
            f"""
            WITH m AS (
                UPDATE rmsg_message m SET status = $2, last_error = NULL, updated_at = now()
                WHERE id = ANY($3::text[]) AND status = $1
                  AND NOT EXISTS (SELECT 1 FROM rmsg_delivery d
                                  WHERE d.message_id = m.id AND d.status = $4)
                RETURNING id
            ), t AS (
                {_TRANSITION} SELECT id, NULL, $1, $2, 'requeue' FROM m
            )
            SELECT id FROM m
            """,
            m_src,
            m_dst,
            [m.id for m in messages],
            D.DEAD.value,
        )
        touched = set(rows) | {r["id"] for r in moved}
        errors = {id: error for (id, _), error in refused.items()}
        return [m.id for m in messages if m.id in touched], errors

    async def _resend_deliveries(
        self, conn: Conn, taken: list[tuple[str, str]], ack_timeout: float
    ) -> list[str]:
        """``dead`` → ``sent`` with a fresh budget for the (message, group) pairs the
        broker took; returns their message ids."""
        if not taken:
            return []
        d_src, d_dst = delivery_move(D.DEAD, D.SENT)
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
                {_TRANSITION} SELECT message_id, group_name, $1, $2, 'requeue' FROM d
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

    # -- retention -------------------------------------------------------------------

    @_translated
    async def purge(self, older_than: float, batch: int) -> int:
        """Delete finished messages older than ``older_than`` seconds, in batches; their
        ids stay in ``rmsg_used_id``, refused to any new message."""
        return await self._delete_in_batches(
            """
            DELETE FROM rmsg_message WHERE id IN (
                SELECT id FROM rmsg_message
                WHERE status IN ($3, $4)
                  AND finished_at < now() - make_interval(secs => $1)
                LIMIT $2)
            """,
            older_than,
            batch,
            M.DONE.value,
            M.CANCELLED.value,
        )

    @_translated
    async def forget_ids(self, older_than: float, batch: int) -> int:
        """Free the used ids older than ``older_than`` seconds whose message is gone."""
        return await self._delete_in_batches(
            """
            DELETE FROM rmsg_used_id WHERE id IN (
                SELECT u.id FROM rmsg_used_id u
                WHERE u.used_at < now() - make_interval(secs => $1)
                  AND NOT EXISTS (SELECT 1 FROM rmsg_message m WHERE m.id = u.id)
                LIMIT $2)
            """,
            older_than,
            batch,
        )

    async def _delete_in_batches(
        self, sql: str, older_than: float, batch: int, *args: object
    ) -> int:
        """Run ``sql`` (``$1`` the age in seconds, ``$2`` the batch size) until it deletes
        fewer than ``batch`` rows; short transactions, so the hot tables never wait long."""
        total = 0
        while True:
            result = await self._pool.execute(sql, older_than, batch, *args)
            deleted = int(result.split()[-1])
            total += deleted
            if deleted < batch:
                return total

    # -- operators' reads ------------------------------------------------------------

    @_translated
    async def history(self, id: str) -> list[Transition]:
        """Every recorded move of message ``id`` and of its deliveries, oldest first."""
        rows = await self._pool.fetch(
            """
            SELECT group_name, from_status, to_status, at, reason FROM rmsg_transition
            WHERE message_id = $1 ORDER BY seq
            """,
            id,
        )
        return [Transition(**dict(r)) for r in rows]

    @_translated
    async def scanner_lag(self) -> dict[str, float]:
        """Per scanner, seconds since its oldest due row fell due (0 when none is due).

        Each is the first entry of the scanner's partial index: cheap at any table size.
        """
        row = await self._pool.fetchrow(
            """
            SELECT
                (SELECT extract(epoch FROM now() - min(next_check_at)) FROM rmsg_message
                 WHERE status = $1 AND next_check_at <= now()) AS checkback,
                (SELECT extract(epoch FROM now() - min(next_attempt_at)) FROM rmsg_delivery
                 WHERE status = $2 AND next_attempt_at <= now()) AS redelivery
            """,
            M.PENDING.value,
            D.SENT.value,
        )
        assert row is not None
        return {name: float(row[name] or 0.0) for name in ("checkback", "redelivery")}


def _unreachable(exc: BaseException) -> bool:
    """A connect that failed because the server is not there (yet), not because it said
    no (bad credentials, no such database)."""
    cause = exc.__cause__
    return isinstance(exc, StoreError) and isinstance(
        cause, (OSError, TimeoutError, asyncpg.CannotConnectNowError)
    )


def _log_waiting(state: RetryCallState) -> None:
    log.warning(
        "PostgreSQL does not answer (%s); trying again",
        state.outcome.exception() if state.outcome else "?",
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to reset when a connection goes back to the pool: the service sets no
    session state (asyncpg's default reset is a round trip per release; an open
    transaction is still rolled back before this runs)."""


def _message(row: asyncpg.Record, deliveries: tuple[Delivery, ...] = ()) -> Message:
    return Message(
        id=row["id"],
        topic=row["topic"],
        producer=row["producer"],
        payload=row["payload"],
        headers=json.loads(row["headers"]),
        key=row["key"],
        status=MessageStatus(row["status"]),
        groups=tuple(row["groups"]),
        check_attempts=row["check_attempts"],
        next_check_at=row["next_check_at"],
        last_error=row["last_error"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        sent_at=row["sent_at"],
        finished_at=row["finished_at"],
        refusals=row["refusals"],
        deliveries=deliveries,
    )


def _delivery(row: asyncpg.Record) -> Delivery:
    return Delivery(
        group=row["group_name"],
        status=DeliveryStatus(row["status"]),
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"] if row["status"] == D.SENT.value else None,
        last_error=row["last_error"],
        updated_at=row["updated_at"],
        done_at=row["done_at"],
    )


def _due_delivery(row: asyncpg.Record) -> Outgoing:
    return Outgoing(
        id=row["message_id"],
        topic=row["topic"],
        producer=row["producer"],
        payload=row["payload"],
        headers=json.loads(row["headers"]),
        key=row["key"],
        created_at=row["created_at"],
        attempt=row["attempts"] + 1,
        group=row["group_name"],
        refusals=row["refusals"],
    )


def _replace_group(out: Outgoing, group: str) -> Outgoing:
    return replace(out, group=group)


async def _publish_per_group(
    publish: PublishMany, outgoing: list[Outgoing]
) -> dict[tuple[str, str], BrokerError]:
    """Publish group by group, so that a refusal names its (message, group): ``publish``
    answers by message id, and one message may go to several groups."""
    by_group: dict[str, list[Outgoing]] = {}
    for out in outgoing:
        assert out.group is not None
        by_group.setdefault(out.group, []).append(out)
    answers = await asyncio.gather(*(publish(outs) for outs in by_group.values()))
    return {
        (id, group): error
        for group, refused in zip(by_group, answers, strict=True)
        for id, error in refused.items()
    }
