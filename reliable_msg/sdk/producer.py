"""The producer SDK: a local transaction and a message that succeed or fail together.

::

    producer = Producer("http://rmsg:8470", token=TOKEN)
    async with pool.acquire() as conn:
        async with producer.transaction(conn, "order.paid", {"order_id": 7}):
            await conn.execute("UPDATE orders SET status = 'paid' WHERE id = 7")

``transaction`` prepares the message, opens ``conn``'s transaction and writes a marker
row (the message id) in it, runs the block, commits, then confirms. If the block raises,
the transaction rolls back and the message is cancelled. If the process dies between
commit and confirm, the service's check-back asks :func:`check_back_router`, which
answers from the marker table.

The check-back rule (never "rolled back" too early): a marker row means committed. With
no marker, the check-back inserts a *fence* row with the same id. A transaction still
open with its marker holds that key, so the fence waits until it ends (up to
``lock_timeout``; then the answer is "unknown" and the service asks again later). If
the fence goes in, no transaction can ever commit that marker, so "rolled back" is a
fact: a late transaction fails on the marker insert with :class:`Fenced`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import APIRouter, Header, HTTPException
from pydantic import BaseModel

from reliable_msg.coalesce import Coalescer
from reliable_msg.errors import (
    Code,
    Conflict,
    Fenced,
    Forbidden,
    ReliableMsgError,
    Unauthorized,
)
from reliable_msg.message import HeaderValue
from reliable_msg.sdk.client import RETRIED, ItemResult, RetryPolicy, ServiceClient
from reliable_msg.sdk.confirms import ConfirmBatching, each_asked
from reliable_msg.states import M

log = logging.getLogger(__name__)

#: The producer's marker table, created by :func:`install` in the producer's database.
MARKER_TABLE = "rmsg_producer_marker"

MARKER_DDL = f"""
CREATE TABLE IF NOT EXISTS {MARKER_TABLE} (
    message_id  text        PRIMARY KEY,
    -- 'committed': written by the business transaction; 'rolled_back': a check-back fence
    state       text        NOT NULL CHECK (state IN ('committed', 'rolled_back')),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS {MARKER_TABLE}_created ON {MARKER_TABLE} (created_at);
"""


#: The default age below which :func:`purge_markers` keeps a marker whatever the service
#: says: the service's default ``scanner.retention``. A fence must outlive any transaction
#: that prepared its id and could still write its marker.
PURGE_AGE = 7 * 24 * 3600.0


async def install(conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> None:
    """Create the marker table in the producer's database (idempotent)."""
    await conn.execute(MARKER_DDL)


async def purge_markers(
    pool: asyncpg.Pool, client: ServiceClient, *, older_than: float = PURGE_AGE, batch: int = 100
) -> int:
    """Delete the markers the service will never check back about; return how many.

    Only markers older than ``older_than`` seconds are looked at, ``batch`` at a time
    (at most the service's ``max_batch``), and the service decides each: a committed
    marker's message is confirmed (what check-back would do with it) and its marker goes
    once the message is sent, done, cancelled or purged; a fence's message is cancelled
    and its fence goes once the message is cancelled or purged. A message that died
    pending (check-back exhausted) keeps its marker: an admin's requeue asks again. When
    the service cannot be reached, the error is raised and the rest is left for next time.
    """
    total, after = 0, ""
    while True:
        rows = await pool.fetch(
            f"SELECT message_id, state FROM {MARKER_TABLE}"
            " WHERE created_at < now() - make_interval(secs => $1) AND message_id > $2"
            " ORDER BY message_id LIMIT $3",
            older_than,
            after,
            batch,
        )
        final = await _final_markers(client, rows) if rows else []
        if final:
            deleted = await pool.execute(
                f"DELETE FROM {MARKER_TABLE} WHERE message_id = ANY($1::text[])", final
            )
            total += int(deleted.split()[-1])
        if len(rows) < batch:
            return total
        after = rows[-1]["message_id"]


async def _final_markers(client: ServiceClient, rows: list[asyncpg.Record]) -> list[str]:
    """The ids whose message is final at the service, moving the pending ones first."""
    committed = [r["message_id"] for r in rows if r["state"] == "committed"]
    fenced = [r["message_id"] for r in rows if r["state"] == "rolled_back"]
    final = []
    if committed:
        final += _settled(await client.confirm_many(committed), {Code.CANCELLED, Code.NOT_FOUND})
    if fenced:
        final += _settled(await client.cancel_many(fenced), {Code.NOT_FOUND})
    return final


def _settled(items: list[ItemResult], final_errors: set[Code]) -> list[str]:
    return [i.id for i in items if i.ok or (i.error is not None and i.error.code in final_errors)]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to send with a local transaction."""

    topic: str
    payload: Any
    key: str | None = None
    headers: dict[str, HeaderValue] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id, "topic": self.topic, "payload": self.payload}
        if self.key is not None:
            body["key"] = self.key
        if self.headers:
            body["headers"] = self.headers
        return body


@dataclass(slots=True)
class Sent:
    """What became of the messages of one transaction.

    ``confirmed`` is False when the confirm could not reach the service after the
    retries: the transaction committed, so the service's check-back will deliver them.
    """

    ids: list[str]
    confirmed: bool = False


Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


class Producer:
    """Sends messages together with the caller's own PostgreSQL transactions."""

    def __init__(
        self,
        base_url: str | Sequence[str] | None = None,
        token: str | None = None,
        *,
        retry: RetryPolicy | None = None,
        client: ServiceClient | None = None,
        confirm_batching: ConfirmBatching | None = None,
    ) -> None:
        if client is None:
            if base_url is None or token is None:
                raise ValueError("Producer needs base_url and token, or a client")
            client = ServiceClient(base_url, token, retry=retry)
        self.client = client
        batching = confirm_batching or ConfirmBatching()
        # The key is constant: one producer, one client, one token.
        self._confirms: Coalescer[str, str, ItemResult] | None = (
            Coalescer(
                self._confirm_call,
                window=batching.window,
                max_items=batching.max_batch,
                max_running=batching.max_running,
                distinct=lambda id: id,
                name="confirm",
                # The credential's, never one transaction's doing: a rate limit still
                # hit after the client's retries, a token refused. Each transaction is
                # told it as a lone confirm would be, not sent again on its own.
                shared_failures=(*RETRIED, Unauthorized, Forbidden),
            )
            if batching.enabled
            else None
        )

    async def __aenter__(self) -> Producer:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._confirms is not None:
            await self._confirms.close()
        await self.client.close()

    async def purge_markers(
        self, pool: asyncpg.Pool, *, older_than: float = PURGE_AGE, batch: int = 100
    ) -> int:
        """:func:`purge_markers` with this producer's client; run it now and then."""
        return await purge_markers(pool, self.client, older_than=older_than, batch=batch)

    @asynccontextmanager
    async def transaction(
        self,
        conn: Conn,
        topic: str,
        payload: Any,
        *,
        key: str | None = None,
        headers: dict[str, HeaderValue] | None = None,
        id: str | None = None,
    ) -> AsyncIterator[Sent]:
        """Run the block in ``conn``'s transaction with one message; see the module."""
        message = Outgoing(topic, payload, key, headers or {}, id or uuid.uuid4().hex)
        async with self.transaction_many(conn, [message]) as sent:
            yield sent

    @asynccontextmanager
    async def transaction_many(
        self, conn: Conn, messages: Sequence[Outgoing]
    ) -> AsyncIterator[Sent]:
        """Run the block in ``conn``'s transaction with several messages, batched.

        ``conn`` must not be in a transaction already: the confirm has to follow the
        real commit, not a savepoint's.
        """
        if conn.is_in_transaction():
            raise RuntimeError("Producer.transaction needs a connection outside a transaction")
        ids = [m.id for m in messages]
        await self._prepare(messages)
        sent = Sent(ids)
        tx = conn.transaction()
        await tx.start()
        try:
            await _write_markers(conn, ids)
            yield sent
        except BaseException as exc:
            await _rollback(tx)
            if isinstance(exc, _MarkerTaken):
                raise await self._marker_conflict(conn, ids) from exc
            await self._cancel_quietly(ids)
            raise
        # A failed COMMIT has an unknown outcome: no cancel; check-back finds the facts.
        await tx.commit()
        sent.confirmed = await self._confirm(ids)

    async def _marker_conflict(self, conn: Conn, ids: list[str]) -> ReliableMsgError:
        """Explain a marker that was already there when this transaction wrote its own."""
        states = await conn.fetch(
            f"SELECT message_id, state FROM {MARKER_TABLE} WHERE message_id = ANY($1::text[])",
            ids,
        )
        committed = [r["message_id"] for r in states if r["state"] == "committed"]
        if committed:
            # Another transaction committed these messages: they are its, not ours to cancel.
            return Conflict(
                f"messages {committed} were already committed by another transaction",
                code=Code.DUPLICATE_TRANSACTION,
            )
        await self._cancel_quietly(ids)
        return Fenced(
            f"a check-back already decided messages {ids} rolled back; "
            "this transaction is rolled back too"
        )

    async def _prepare(self, messages: Sequence[Outgoing]) -> None:
        if len(messages) == 1:
            answer = await self.client.prepare(messages[0].body())
            _refuse_decided({messages[0].id: answer.get("status")})
            return
        items = await self.client.prepare_many([m.body() for m in messages])
        failed = [item.error for item in items if item.error is not None]
        if failed:
            # Only what this call created is ours to cancel: an id that existed already
            # may be an earlier attempt's committed message; check-back decides those.
            created = [item.id for item in items if item.created]
            if created:
                await self._cancel_quietly(created)
            raise failed[0]
        # No cancel here: an earlier attempt may have committed them; check-back decides.
        _refuse_decided({item.id: item.status for item in items})

    async def _confirm(self, ids: list[str]) -> bool:
        try:
            if self._confirms is None:
                items = await self._confirm_call("", ids)
            else:
                items = await self._confirms("", ids)
                error = items[0].error
                if len(ids) == 1 and error is not None and isinstance(error, RETRIED):
                    # A shared batch found this message not publishable yet (no queue,
                    # broker down); on its own the call would have been retried: do so.
                    items = await self._confirm_call("", ids)
        except RETRIED as exc:
            _not_confirmed(ids, exc)
            return False
        failed = [i for i in items if i.error is not None]
        later = [i for i in failed if isinstance(i.error, RETRIED)]
        if later:
            _not_confirmed([i.id for i in later], later[0].error)
        # An item refused for good (dead, say) is raised, not left to check-back.
        for item in failed:
            if item not in later and item.error is not None:
                raise item.error
        return not failed

    async def _confirm_call(self, _: str, ids: list[str]) -> list[ItemResult]:
        """One confirm call for ``ids``: the single route for one id (its answer, error
        and retries are those of a lone confirm), the batch route for several."""
        if len(ids) == 1:
            answer = await self.client.confirm(ids[0])
            return [ItemResult(ids[0], True, answer.get("status"), None, None)]
        return each_asked(ids, await self.client.confirm_many(ids))

    async def _cancel_quietly(self, ids: list[str]) -> None:
        try:
            if len(ids) == 1:
                await self.client.cancel(ids[0])
            else:
                await self.client.cancel_many(ids)
        except ReliableMsgError as exc:
            # The message stays pending; check-back will find no marker and cancel it.
            log.warning("could not cancel %s (%s); check-back will", ",".join(ids), exc)


def _not_confirmed(ids: list[str], error: Exception | None) -> None:
    log.warning(
        "messages %s committed but not confirmed (%s); check-back will deliver them",
        ",".join(ids),
        error,
    )


def _refuse_decided(statuses: dict[str, Any]) -> None:
    """Raise before the local transaction if a re-prepared id is no longer pending.

    Preparing an id again returns the message as it is. If an earlier attempt's
    transaction was decided, running this one would commit business data whose message
    can never be sent (cancelled), or commit it a second time (sent or done).
    """
    cancelled = sorted(i for i, s in statuses.items() if s == M.CANCELLED)
    if cancelled:
        raise Conflict(
            f"messages {cancelled} were cancelled: an earlier transaction with these ids"
            " rolled back; use new ids",
            code=Code.MESSAGE_CANCELLED,
        )
    sent = sorted(i for i, s in statuses.items() if s not in (M.PENDING, M.CANCELLED))
    if sent:
        raise Conflict(
            f"messages {sent} were already committed by another transaction",
            code=Code.DUPLICATE_TRANSACTION,
        )


class _MarkerTaken(ReliableMsgError):
    """A marker with one of this transaction's ids exists already."""


async def _write_markers(conn: Conn, ids: list[str]) -> None:
    try:
        await conn.execute(
            f"INSERT INTO {MARKER_TABLE} (message_id, state)"
            " SELECT unnest($1::text[]), 'committed'",
            ids,
        )
    except asyncpg.UniqueViolationError as exc:
        raise _MarkerTaken(f"a marker of {ids} exists already") from exc


async def _rollback(tx: asyncpg.transaction.Transaction) -> None:
    try:
        await tx.rollback()
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        # The connection is gone; the server rolls the transaction back by itself.
        log.warning("rollback failed: %s", exc)


async def check_back(pool: asyncpg.Pool, id: str, *, lock_timeout: float = 2.0) -> str:
    """The answer to a check-back for message ``id``: committed, rolled_back or unknown."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout * 1000)}ms'")
        try:
            fenced = await conn.fetchval(
                f"INSERT INTO {MARKER_TABLE} (message_id, state) VALUES ($1, 'rolled_back')"
                " ON CONFLICT (message_id) DO NOTHING RETURNING state",
                id,
            )
        except asyncpg.LockNotAvailableError:
            return "unknown"
        if fenced:
            return "rolled_back"
        # A new statement, so a new snapshot: it sees a marker committed while we waited.
        state: str | None = await conn.fetchval(
            f"SELECT state FROM {MARKER_TABLE} WHERE message_id = $1", id
        )
    return state or "unknown"


def check_back_router(
    pool: asyncpg.Pool, token: str, *, path: str = "/rmsg/check-back", lock_timeout: float = 2.0
) -> APIRouter:
    """A FastAPI router answering the service's check-back from the marker table.

    Mount it in the producer's app and declare its URL as the producer's ``check_url``.
    Only a request carrying the producer's own token is answered.
    """
    router = APIRouter()
    expected = hashlib.sha256(token.encode()).digest()

    @router.post(path, response_model=CheckBackAnswer)
    async def answer(
        body: CheckBackQuestion, authorization: Annotated[str | None, Header()] = None
    ) -> CheckBackAnswer:
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(hashlib.sha256(given.encode()).digest(), expected):
            raise HTTPException(401, "unknown token")
        return CheckBackAnswer(status=await check_back(pool, body.id, lock_timeout=lock_timeout))

    return router


class CheckBackQuestion(BaseModel):
    id: str
    topic: str
    created_at: str


class CheckBackAnswer(BaseModel):
    status: Literal["committed", "rolled_back", "unknown"]
