"""The consumer SDK: each message has exactly one effect in the consumer's database.

::

    consumer = Consumer("inventory", service_url=URL, token=TOKEN, amqp_url=AMQP, pool=pool)

    @consumer.handler("order.paid")
    async def reserve(conn, message):
        await conn.execute("UPDATE stock SET available = available - $1 ...", ...)

    await consumer.run()  # until SIGTERM or consumer.request_stop()

A handler runs inside a transaction of ``conn`` that also inserts an *inbox* row keyed
by (group, message id); a redelivered message finds its inbox row and is not handled
again. After the commit the message is acked to the service (in batches), and only then
to RabbitMQ. A handler that raises rolls back; the message is left to the service's
redelivery (with its backoff) and the error is logged with the message id.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import aio_pika
import asyncpg
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from . import constants
from .client import RetryPolicy, ServiceClient
from .errors import ReliableMsgError

log = logging.getLogger(__name__)

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


@dataclass(frozen=True, slots=True)
class Received:
    """A message as a handler sees it."""

    id: str
    topic: str
    payload: Any
    headers: dict[str, Any] = field(default_factory=dict)
    key: str | None = None
    attempt: int = 1
    producer: str | None = None


#: A message handler: the asyncpg connection of the transaction, and the message.
Handler = Callable[[asyncpg.Connection, Received], Awaitable[None]]


class Poison(ValueError):
    """A delivery that no handler can ever take (not JSON, no id, no handler)."""


class Consumer:
    """Consumes one group's queue and hands each message to the handler of its topic."""

    def __init__(
        self,
        group: str,
        *,
        service_url: str,
        token: str,
        amqp_url: str,
        pool: asyncpg.Pool,
        queue: str | None = None,
        prefetch: int = 64,
        concurrency: int = 16,
        ack_batch: int = 200,
        ack_interval: float = 0.05,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.group = group
        self.queue = queue or f"{constants.QUEUE_PREFIX}{group}"
        self._client = ServiceClient(service_url, token, retry=retry)
        self._amqp_url = amqp_url
        self._pool = pool
        self._prefetch = prefetch
        self._limit = asyncio.Semaphore(concurrency)
        self._handlers: dict[str, Handler] = {}
        self.acks = AckBatcher(self._client, ack_batch, ack_interval)
        self._stopping = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()

    def handler(self, topic: str) -> Callable[[Handler], Handler]:
        """Register the decorated coroutine as the handler of ``topic``."""

        def register(fn: Handler) -> Handler:
            self.add_handler(topic, fn)
            return fn

        return register

    def add_handler(self, topic: str, fn: Handler) -> None:
        if topic in self._handlers:
            raise ValueError(f"topic {topic!r} already has a handler")
        self._handlers[topic] = fn

    def request_stop(self) -> None:
        """Ask :meth:`run` to stop: no new messages; in-flight ones finish and are acked."""
        self._stopping.set()

    async def run(self, *, handle_signals: bool = True) -> None:
        """Consume until :meth:`request_stop` (or SIGTERM / SIGINT)."""
        if handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        connection = await self._connect()
        acks = asyncio.create_task(self.acks.run())
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=self._prefetch)
            queue = await channel.get_queue(self.queue, ensure=True)
            tag = await queue.consume(self._on_message)
            log.info("consumer %s: consuming %s", self.group, self.queue)
            await self._stopping.wait()
            await queue.cancel(tag)
            if self._in_flight:
                await asyncio.wait(set(self._in_flight))
            await self.acks.close()
            await acks
        finally:
            acks.cancel()
            await connection.close()
            await self._client.close()
        log.info("consumer %s: stopped", self.group)

    async def _connect(self) -> AbstractRobustConnection:
        delay = 0.2
        while True:
            try:
                return await aio_pika.connect_robust(self._amqp_url)
            except (OSError, aio_pika.exceptions.AMQPError) as exc:
                if self._stopping.is_set():
                    raise
                log.warning("consumer %s: RabbitMQ unreachable (%s); retrying", self.group, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        try:
            async with self._limit:
                await self._process(message)
        finally:
            self._in_flight.discard(task)

    async def _process(self, message: AbstractIncomingMessage) -> None:
        try:
            received = self._decode(message)
        except Poison as exc:
            log.error("consumer %s: rejected delivery %s: %s", self.group, message.message_id, exc)
            await message.reject(requeue=False)
            return
        try:
            await self.handle(received)
        except Exception:
            log.exception(
                "consumer %s: handler of %s failed for message %s (attempt %d); "
                "the service will redeliver it",
                self.group,
                received.topic,
                received.id,
                received.attempt,
            )
            await message.ack()  # the service, not RabbitMQ, owns the retry and its backoff
            return
        self.acks.add(received.id, message)

    def _decode(self, message: AbstractIncomingMessage) -> Received:
        if not message.message_id:
            raise Poison("no message_id")
        topic = message.type or ""
        if topic not in self._handlers:
            raise Poison(f"no handler for topic {topic!r}")
        try:
            payload = json.loads(message.body)
        except ValueError as exc:
            raise Poison(f"body is not JSON: {exc}") from exc
        headers = dict(message.headers or {})
        attempt = headers.pop(constants.HEADER_ATTEMPT, 1)
        producer = headers.pop(constants.HEADER_PRODUCER, None)
        key = headers.pop(constants.HEADER_KEY, None)
        return Received(
            id=message.message_id,
            topic=topic,
            payload=payload,
            headers=headers,
            key=str(key) if key is not None else None,
            attempt=int(attempt) if isinstance(attempt, int) else 1,
            producer=str(producer) if producer is not None else None,
        )

    async def handle(self, received: Received) -> bool:
        """Run the handler with the inbox row in one transaction; False if it was a
        duplicate (already handled, nothing done)."""
        handler = self._handlers[received.topic]
        async with self._pool.acquire() as conn, conn.transaction():
            fresh = await conn.fetchval(
                f"INSERT INTO {INBOX_TABLE} (group_name, message_id, topic) VALUES ($1, $2, $3)"
                " ON CONFLICT DO NOTHING RETURNING true",
                self.group,
                received.id,
                received.topic,
            )
            if not fresh:
                log.info("consumer %s: message %s already handled", self.group, received.id)
                return False
            await handler(cast(asyncpg.Connection, conn), received)
        return True


class AckBatcher:
    """Acks handled messages to the service in batches, then each to RabbitMQ."""

    def __init__(self, client: ServiceClient, size: int, interval: float) -> None:
        self._client = client
        self._size = size
        self._interval = interval
        self._pending: list[tuple[str, AbstractIncomingMessage]] = []
        self._wake = asyncio.Event()
        self._closing = False
        #: Batches acked to the service so far.
        self.batches = 0

    def add(self, id: str, message: AbstractIncomingMessage) -> None:
        self._pending.append((id, message))
        if len(self._pending) >= self._size:
            self._wake.set()

    async def close(self) -> None:
        """Flush what is left and end :meth:`run`."""
        self._closing = True
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self._interval)
            except TimeoutError:
                pass
            self._wake.clear()
            while self._pending:
                batch, self._pending = self._pending[: self._size], self._pending[self._size :]
                await self._flush(batch)
            if self._closing:
                return

    async def _flush(self, batch: list[tuple[str, AbstractIncomingMessage]]) -> None:
        delay = 0.2
        while True:
            try:
                results = await self._client.ack_many(list(dict.fromkeys(i for i, _ in batch)))
                break
            except ReliableMsgError as exc:
                if self._closing:
                    # Unacked, RabbitMQ delivers them again; the inbox makes that harmless.
                    log.warning("shutting down with %d messages not acked: %s", len(batch), exc)
                    return
                log.warning("acks to the service failed (%s); retrying %d", exc, len(batch))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.batches += 1
        for result in results:
            if result.error is not None:
                # Handled and in the inbox: a requeue or republish will be absorbed.
                log.warning("ack of %s: %s", result.id, result.error)
        for id, message in batch:
            try:
                await message.ack()
            except Exception as exc:  # the channel went away: RabbitMQ redelivers; inbox absorbs
                log.info("AMQP ack of %s lost (%s)", id, exc)
