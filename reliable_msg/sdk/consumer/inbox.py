"""The consumer's inbox: a row per (group, message id) handled, inserted in the handler's
own transaction, so that a message delivered again finds its row and has no second effect.

Messages that wait for a transaction at the same time share one (see
:class:`SharedTransactions`): one commit for many effects. If that transaction fails for
any reason, each of its messages is handled again in a transaction of its own, so a
failing handler holds back no other message and its effect is never half kept.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import cast

import asyncpg

from reliable_msg.errors import Code
from reliable_msg.sdk.client import ItemResult, ServiceClient

from ._log import log
from .message import Handler, Received

#: The consumer's inbox table, created by :func:`install` in the consumer's database.
INBOX_TABLE = "rmsg_inbox"

INBOX_DDL = f"""
CREATE TABLE IF NOT EXISTS {INBOX_TABLE} (
    group_name   text        NOT NULL,
    message_id   text        NOT NULL,
    topic        text        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_name, message_id)
);
CREATE INDEX IF NOT EXISTS {INBOX_TABLE}_processed ON {INBOX_TABLE} (processed_at);
"""

Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


async def install(conn: Conn) -> None:
    """Create the inbox table in the consumer's database (idempotent)."""
    await conn.execute(INBOX_DDL)


#: The default age below which :func:`purge_inbox` keeps a row whatever the service says:
#: the service's default ``scanner.retention``, so that a copy published before the ack
#: and read late still finds its row while the service knows the message.
PURGE_AGE = 7 * 24 * 3600.0


async def purge_inbox(
    pool: asyncpg.Pool,
    client: ServiceClient,
    group: str,
    *,
    older_than: float = PURGE_AGE,
    batch: int = 100,
) -> int:
    """Delete the inbox rows of ``group`` that no redelivery can need; return how many.
    Run it now and then with a client of the group's token::

        async with ServiceClient(URL, TOKEN) as client:
            await purge_inbox(pool, client, "inventory")

    Only rows older than ``older_than`` seconds are looked at, ``batch`` at a time (at
    most the service's ``max_batch``), and each is acked again (a row means handled):
    it goes once its delivery has been done for ``older_than`` already, or the service
    no longer knows the message (purged). A delivery this ack makes done keeps its row,
    since a copy published before (a redelivery, an admin's requeue of a dead one) may
    still be on its way; so does a dead delivery, which an admin's requeue delivers
    again. When the service cannot be reached, the error is raised and the rest is left
    for next time.
    """
    total, after = 0, ""
    done_before = datetime.now(UTC) - timedelta(seconds=older_than)
    while True:
        rows = await pool.fetch(
            f"SELECT message_id FROM {INBOX_TABLE} WHERE group_name = $1"
            " AND processed_at < now() - make_interval(secs => $2) AND message_id > $3"
            " ORDER BY message_id LIMIT $4",
            group,
            older_than,
            after,
            batch,
        )
        acked = await client.ack_many([r["message_id"] for r in rows]) if rows else []
        final = [a.id for a in acked if _final(a, done_before)]
        if final:
            deleted = await pool.execute(
                f"DELETE FROM {INBOX_TABLE} WHERE group_name = $1 AND message_id = ANY($2::text[])",
                group,
                final,
            )
            total += int(deleted.split()[-1])
        if len(rows) < batch:
            return total
        after = rows[-1]["message_id"]


def _final(acked: ItemResult, done_before: datetime) -> bool:
    """Whether no copy of an acked message can still come: its delivery was done before
    ``done_before`` (``done_at`` is set only when it was done before this ack), or the
    service no longer knows the message."""
    if acked.error is not None:
        return acked.error.code == Code.NOT_FOUND
    return acked.done_at is not None and acked.done_at < done_before


class Inbox:
    """Runs each message's handler in a transaction that also inserts its inbox row,
    shared with the messages waiting at the same time: ``concurrency`` transactions at
    once, each of up to ``handle_batch`` messages."""

    def __init__(
        self,
        group: str,
        pool: asyncpg.Pool,
        handlers: Mapping[str, Handler],
        concurrency: int,
        handle_batch: int,
    ) -> None:
        self._group = group
        self._pool = pool
        self._handlers = handlers
        self._transactions = SharedTransactions(self._handle_waiting, concurrency, handle_batch)

    async def handle(self, received: Received) -> bool:
        """Handle ``received`` (its topic has a handler); returns after the commit; False
        if it was a duplicate (already handled, nothing done)."""
        return await self._transactions.run(received)

    async def _handle_waiting(self, take: Take) -> list[Result]:
        """Open a transaction, then take the messages waiting by then and handle them in
        it; if that fails, handle each in one of its own. The outcome of each message
        taken: handled, duplicate or its handler's error."""
        batch: list[Received] | None = None
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                batch = take()
                outcomes = await self._handle_in(conn, batch)
        except Exception as exc:
            if batch is None:  # no transaction to share
                batch = take()
            elif len(batch) == 1:
                return [exc]
            else:
                log.info(
                    "consumer %s: a transaction of %d messages failed (%r); "
                    "handling each in its own",
                    self._group,
                    len(batch),
                    exc,
                )
            return await self._handle_each(batch)
        self._log_duplicates(batch, outcomes)
        return [*outcomes]

    async def _handle_each(self, batch: list[Received]) -> list[Result]:
        outcomes: list[Result] = []
        for received in batch:
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    handled = await self._handle_in(conn, [received])
                self._log_duplicates([received], handled)
                outcomes.extend(handled)
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    async def _handle_in(self, conn: Conn, batch: list[Received]) -> list[bool]:
        """In ``conn``'s transaction: insert the inbox rows and run the handlers of the
        fresh messages; True for each message handled, False for a duplicate."""
        # In id order, so that two transactions taking the same ids cannot deadlock.
        rows = await conn.fetch(
            f"INSERT INTO {INBOX_TABLE} (group_name, message_id, topic)"
            " SELECT $1, u.id, u.topic FROM unnest($2::text[], $3::text[]) AS u(id, topic)"
            " ORDER BY u.id ON CONFLICT DO NOTHING RETURNING message_id",
            self._group,
            [r.id for r in batch],
            [r.topic for r in batch],
        )
        fresh = {r["message_id"] for r in rows}
        outcomes = []
        for received in batch:
            outcomes.append(received.id in fresh)
            if received.id in fresh:
                fresh.discard(received.id)  # a second copy in the batch is a duplicate
                await self._handlers[received.topic](cast(asyncpg.Connection, conn), received)
        return outcomes

    def _log_duplicates(self, batch: list[Received], outcomes: list[bool]) -> None:
        for received, handled in zip(batch, outcomes, strict=True):
            if not handled:
                log.info(
                    "consumer %s: message %s already handled",
                    self._group,
                    received.id,
                    extra={"message_id": received.id},
                )


#: What became of one message: handled (True), a duplicate (False) or its handler's error.
Result = bool | Exception
#: Takes the messages waiting for a transaction (at least one), for the one just opened.
Take = Callable[[], list[Received]]
#: Opens a transaction, calls ``take`` once and handles what it took; one outcome per
#: message taken, in order.
HandleWaiting = Callable[[Take], Awaitable[list[Result]]]


class SharedTransactions:
    """Runs the messages waiting at the same time in one handler transaction.

    At most ``slots`` transactions run at once, and at most one of them is opening: it
    takes the messages waiting once it is open, up to ``size``, so that those arriving
    while it connects and begins join it at no cost. A lone message waits for nothing
    but its own transaction; under load the batches grow with the wait.
    """

    def __init__(self, handle: HandleWaiting, slots: int, size: int) -> None:
        self._handle = handle
        self._slots = max(1, slots)
        self._size = max(1, size)
        self._busy = 0
        self._opening = False
        self._waiting: list[tuple[Received, asyncio.Future[Result]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, received: Received) -> bool:
        """Handle ``received`` with the next transaction; its outcome once committed."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((received, future))
        self._open()
        outcome = await future
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _open(self) -> None:
        if self._waiting and not self._opening and self._busy < self._slots:
            self._opening = True
            self._busy += 1
            task = asyncio.create_task(self._transaction())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _transaction(self) -> None:
        taken: list[tuple[Received, asyncio.Future[Result]]] = []

        def take() -> list[Received]:
            nonlocal taken
            taken, self._waiting = self._waiting[: self._size], self._waiting[self._size :]
            self._opening = False
            self._open()  # the next transaction opens while this one works
            return [received for received, _ in taken]

        try:
            outcomes = await self._handle(take)
        except BaseException:  # cancelled: whatever it had done is rolled back
            for _, future in taken:
                future.cancel()
            raise
        finally:
            if not taken:  # ``take`` not called: the messages wait for the next one
                self._opening = False
            self._busy -= 1
            self._open()
        for (_, future), outcome in zip(taken, outcomes, strict=True):
            if not future.done():
                future.set_result(outcome)
