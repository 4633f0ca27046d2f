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

Messages that wait for a transaction at the same time share one (see
:class:`SharedTransactions`): one commit for many effects. If that transaction fails
for any reason, each of its messages is handled again in a transaction of its own, so
a failing handler holds back no other message and its effect is never half kept.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import aio_pika
import asyncpg
import redis.asyncio as aioredis
from aio_pika.abc import AbstractIncomingMessage

from reliable_msg import constants
from reliable_msg.aio import first_of, stop_task
from reliable_msg.errors import ReliableMsgError
from reliable_msg.sdk.client import ItemResult, RetryPolicy, ServiceClient
from reliable_msg.transports.redis import REDIS_ERRORS, Entry, FallbackReader, Malformed, Read
from reliable_msg.transports.switch import Mode, Switch

log = logging.getLogger(__name__)

#: The consumer's inbox table, created by :func:`install` in the consumer's database.
INBOX_TABLE = "rmsg_inbox"
#: Seconds one Redis call of the fallback workers may take.
REDIS_TIMEOUT = 5.0
#: Seconds a stopping consumer waits at most for the service to take its last acks.
STOP_TIMEOUT = 10.0

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
        return acked.error.code == "not_found"
    return acked.done_at is not None and acked.done_at < done_before


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
    """Consumes one group's messages and hands each to the handler of its topic.

    Normally from the group's RabbitMQ queue. With ``redis_url`` it also follows the
    degradation switch (DESIGN §6): when the switch is on it keeps its RabbitMQ consumer
    while that still works, and starts ``redis_workers`` workers over the group's
    fallback shards; after the switch clears, the workers drain the shards until they are
    empty, and only then does the consumer go back to RabbitMQ alone (reconnecting to it
    if it had lost it). Every path uses the same handler, inbox and acks. The group's
    shard count is the one the service records in Redis; ``shards`` holds until it has.
    """

    def __init__(
        self,
        group: str,
        *,
        service_url: str | Sequence[str],
        token: str,
        amqp_url: str,
        pool: asyncpg.Pool,
        queue: str | None = None,
        prefetch: int = 64,
        concurrency: int = 16,
        handle_batch: int = 100,
        ack_batch: int = 200,
        ack_interval: float = 0.05,
        retry: RetryPolicy | None = None,
        redis_url: str | None = None,
        namespace: str = constants.REDIS_NAMESPACE,
        shards: int = 128,
        redis_workers: int = 8,
        poll_interval: float = 1.0,
        claim_idle: float = 30.0,
        dead_maxlen: int = constants.FALLBACK_DEAD_MAXLEN,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        self.group = group
        self.queue = queue or f"{constants.QUEUE_PREFIX}{group}"
        self._client = ServiceClient(service_url, token, retry=retry)
        self._amqp_url = amqp_url
        self._pool = pool
        self._prefetch = prefetch
        self._handlers: dict[str, Handler] = {}
        #: ``concurrency`` handler transactions at once, each of up to ``handle_batch``
        #: messages; the messages in hand are bounded by ``prefetch`` (and, from Redis, by
        #: the workers' reads).
        self._transactions = SharedTransactions(self._handle_waiting, concurrency, handle_batch)
        self.acks = AckBatcher(self._client, ack_batch, ack_interval)
        self._stopping = asyncio.Event()
        self._stop_timeout = stop_timeout
        #: When the acks at stop give up (monotonic), set by the first wait for them.
        self._give_up_at: float | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self.mode = Mode.NORMAL  #: DEGRADED while the fallback workers run
        self._mode_changed = asyncio.Event()
        self._fallback = (
            FallbackDrain(
                self,
                # Bounded calls: a Redis that hangs must not hang the workers (reads
                # never block on the server side).
                aioredis.Redis.from_url(
                    redis_url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT
                ),
                namespace=namespace,
                shards=shards,
                workers=redis_workers,
                poll_interval=poll_interval,
                claim_idle=claim_idle,
                dead_maxlen=dead_maxlen,
            )
            if redis_url
            else None
        )

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

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def set_mode(self, mode: Mode) -> None:
        if mode is not self.mode:
            log.warning("consumer %s: now consuming %s", self.group, _SOURCE[mode])
            self.mode = mode
            self._mode_changed.set()

    async def run(self, *, handle_signals: bool = True) -> None:
        """Consume until :meth:`request_stop` (or SIGTERM / SIGINT)."""
        if handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        self._give_up_at = None
        acks = asyncio.create_task(self.acks.run())
        tasks = [asyncio.create_task(self._amqp_loop())]
        if self._fallback is not None:
            tasks.append(asyncio.create_task(self._fallback.run()))
        try:
            await self._stopping.wait()
            await asyncio.gather(*tasks)
            if self._in_flight:
                await asyncio.wait(set(self._in_flight))
            await self.acks.close()
            await self._bounded(acks)
        finally:
            for task in (*tasks, acks):
                task.cancel()
            await asyncio.gather(*tasks, acks, return_exceptions=True)
            if self._fallback is not None:
                await self._fallback.close()
            await self._client.close()
        log.info("consumer %s: stopped", self.group)

    # -- RabbitMQ ----------------------------------------------------------------------

    async def _amqp_loop(self) -> None:
        """Stay attached to the queue; after a loss while degraded, wait for normal mode."""
        delay = 0.2
        while not self.stopping:
            if self.mode is Mode.DEGRADED and not await self._wait_for_normal():
                return
            try:
                await self._consume_amqp()
                delay = 0.2
            except (OSError, aio_pika.exceptions.AMQPError, RuntimeError) as exc:
                log.warning("consumer %s: RabbitMQ unavailable (%s)", self.group, exc)
            if not self.stopping:
                await self._sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _wait_for_normal(self) -> bool:
        """Wait until the mode is normal again; False if stopping first."""
        while self.mode is Mode.DEGRADED and not self.stopping:
            self._mode_changed.clear()
            await first_of(self._stopping.wait(), self._mode_changed.wait())
        return not self.stopping

    async def _consume_amqp(self) -> None:
        connecting = asyncio.ensure_future(aio_pika.connect(self._amqp_url, timeout=10))
        await first_of(asyncio.shield(connecting), self._stopping.wait())
        if not connecting.done():  # asked to stop while connecting
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
            return
        connection = connecting.result()
        lost = asyncio.Event()
        connection.close_callbacks.add(lambda *_: lost.set())
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=self._prefetch)
            queue = await channel.get_queue(self.queue, ensure=True)
            tag = await queue.consume(self._on_message)
            log.info("consumer %s: consuming %s", self.group, self.queue)
            await first_of(self._stopping.wait(), lost.wait())
            if not lost.is_set():
                await queue.cancel(tag)
                # Ack on this channel before it closes whatever was handled, in flight or
                # waiting in the batcher: RabbitMQ would deliver it again otherwise.
                if self._in_flight:
                    await asyncio.wait(set(self._in_flight))
                await self._bounded(self.acks.flush_now())
        finally:
            await connection.close()

    async def _bounded(self, acks: Awaitable[None]) -> None:
        """Wait for acks at stop, at most ``stop_timeout`` seconds in all: a service that
        cannot be reached must not keep the consumer from exiting. What is not acked is
        delivered again, and its inbox row makes that harmless."""
        if self._give_up_at is None:
            self._give_up_at = time.monotonic() + self._stop_timeout
        try:
            await asyncio.wait_for(acks, max(self._give_up_at - time.monotonic(), 0.0))
        except TimeoutError:
            log.warning(
                "consumer %s: stopping with acks the service did not take within %.1f s;"
                " they are delivered again",
                self.group,
                self._stop_timeout,
            )

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        try:
            await self._process_amqp(message)
        finally:
            self._in_flight.discard(task)

    async def _process_amqp(self, message: AbstractIncomingMessage) -> None:
        try:
            received = self._decode(message)
        except Poison as exc:
            log.error(
                "consumer %s: rejected delivery %s: %s",
                self.group,
                message.message_id,
                exc,
                extra={"message_id": message.message_id},
            )
            await message.reject(requeue=False)
            return
        await self.process(received, _amqp_ack(message))

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

    # -- both paths --------------------------------------------------------------------

    async def process(self, received: Received, finish: Finish) -> None:
        """Handle one message; ``finish`` releases it at its source (AMQP ack or stream
        delete) once the service has the ack, or at once when the handler failed."""
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
                extra={"message_id": received.id},
            )
            # The service, not the transport, owns the retry and its backoff.
            await _release_failed(received.id, finish)
            return
        self.acks.add(received.id, finish)

    def knows(self, topic: str) -> bool:
        return topic in self._handlers

    async def handle(self, received: Received) -> bool:
        """Run the handler with the inbox row in one transaction, which it may share with
        other messages; returns after the commit; False if it was a duplicate (already
        handled, nothing done)."""
        return await self._transactions.run(received)

    async def _handle_waiting(self, take: Take) -> list[Outcome]:
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
                    self.group,
                    len(batch),
                    exc,
                )
            return await self._handle_each(batch)
        self._log_duplicates(batch, outcomes)
        return [*outcomes]

    async def _handle_each(self, batch: list[Received]) -> list[Outcome]:
        outcomes: list[Outcome] = []
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
            self.group,
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
                    self.group,
                    received.id,
                    extra={"message_id": received.id},
                )


_SOURCE = {Mode.NORMAL: "RabbitMQ", Mode.DEGRADED: "the Redis fallback shards"}

#: Releases a handled message at its source.
Finish = Callable[[], Awaitable[None]]


async def _release_failed(id: str, finish: Finish) -> None:
    """Release a message whose handler failed; if its source is away, it is the source's
    to deliver again (RabbitMQ requeues, a Redis entry is reclaimed)."""
    try:
        await finish()
    except Exception as exc:
        log.warning("release of %s at its source lost (%s)", id, exc, extra={"message_id": id})


def _amqp_ack(message: AbstractIncomingMessage) -> Finish:
    async def finish() -> None:
        await message.ack()

    return finish


#: What became of one message: handled (True), a duplicate (False) or its handler's error.
Outcome = bool | Exception
#: Takes the messages waiting for a transaction (at least one), for the one just opened.
Take = Callable[[], list[Received]]
#: Opens a transaction, calls ``take`` once and handles what it took; one outcome per
#: message taken, in order.
HandleWaiting = Callable[[Take], Awaitable[list[Outcome]]]


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
        self._waiting: list[tuple[Received, asyncio.Future[Outcome]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, received: Received) -> bool:
        """Handle ``received`` with the next transaction; its outcome once committed."""
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
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
        taken: list[tuple[Received, asyncio.Future[Outcome]]] = []

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


class FallbackDrain:
    """A consumer's workers over its group's Redis fallback shards."""

    def __init__(
        self,
        consumer: Consumer,
        redis: aioredis.Redis,
        *,
        namespace: str,
        shards: int,
        workers: int,
        poll_interval: float,
        claim_idle: float,
        dead_maxlen: int,
    ) -> None:
        self._consumer = consumer
        self._redis = redis
        name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.reader = FallbackReader(
            redis,
            namespace=namespace,
            group=consumer.group,
            shards=shards,
            consumer=name,
            dead_maxlen=dead_maxlen,
        )
        self.switch = Switch(
            redis,
            who=f"consumer {consumer.group} {name}",
            namespace=namespace,
            poll_interval=poll_interval,
        )
        self._workers = max(1, workers)
        self._poll = poll_interval
        self._claim_idle = claim_idle

    async def close(self) -> None:
        await self._redis.aclose()

    async def run(self) -> None:
        """Follow the switch; drain the shards while degraded and until they are empty."""
        watch = asyncio.create_task(self.switch.watch())
        try:
            while not self._consumer.stopping:
                if await self._needed():
                    await self._drain()
                else:
                    await self._pause()
        finally:
            self.switch.stop()
            await stop_task(watch, within=self._poll + 2)

    async def _needed(self) -> bool:
        try:
            await self.reader.learn_shards()
            return self.switch.degraded or await self.reader.depth() > 0
        except REDIS_ERRORS:
            return self.switch.degraded

    async def _pause(self) -> None:
        waiter = asyncio.ensure_future(self.switch.changed())
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self._poll)
        except TimeoutError:
            pass
        finally:
            waiter.cancel()

    async def _drain(self) -> None:
        consumer = self._consumer
        consumer.set_mode(Mode.DEGRADED)
        while not consumer.stopping:
            await self._retrying(self.reader.prepare)
            if await self._drain_keys(self.reader.keys):
                break
        if not consumer.stopping:
            log.warning("consumer %s: fallback shards drained", consumer.group)
            consumer.set_mode(Mode.NORMAL)

    async def _drain_keys(self, keys: list[str]) -> bool:
        """Work on ``keys`` until the switch is off and they are empty, or stopping (True),
        or until the group's shard count changes (False)."""
        consumer = self._consumer
        workers_n = max(1, min(self._workers, len(keys)))
        parts = [keys[i::workers_n] for i in range(workers_n)]
        workers = [asyncio.create_task(self._work(part)) for part in parts]
        try:
            while not consumer.stopping:
                await self._sleep(self._poll)
                if await self._resharded(keys):
                    return False
                if not self.switch.degraded and await self._empty():
                    return True
            return True
        finally:
            self._stop_workers = True
            await asyncio.gather(*workers, return_exceptions=True)
            self._stop_workers = False

    _stop_workers = False

    async def _resharded(self, keys: list[str]) -> bool:
        try:
            await self.reader.learn_shards()
        except REDIS_ERRORS:
            return False
        return self.reader.keys != keys

    async def _empty(self) -> bool:
        try:
            return await self.reader.depth() == 0
        except REDIS_ERRORS:
            return False

    async def _work(self, keys: list[str]) -> None:
        """Run a worker over ``keys`` until told to stop, restarting it after an
        unexpected error: a worker that ended would leave its shards unread for ever, and
        the consumer degraded with them."""
        while not self._stop_workers and not self._consumer.stopping:
            try:
                await self._read_loop(keys)
            except Exception:
                log.exception(
                    "consumer %s: a fallback worker failed; restarting it in %.1f s",
                    self._consumer.group,
                    self._poll,
                )
                await self._sleep(self._poll)

    async def _read_loop(self, keys: list[str]) -> None:
        """Read new entries of ``keys`` (and reclaim stale ones) until told to stop."""
        last_claim = 0.0
        loop = asyncio.get_running_loop()
        while not self._stop_workers and not self._consumer.stopping:
            try:
                entries = await self.reader.read(keys, count=16)
                if loop.time() - last_claim > self._claim_idle / 2:
                    entries += await self.reader.reclaim(keys, self._claim_idle, count=16)
                    last_claim = loop.time()
            except REDIS_ERRORS as exc:
                log.warning("consumer %s: Redis unavailable (%s)", self._consumer.group, exc)
                await self._sleep(self._poll)
                continue
            if not entries:
                await self._sleep(0.05)
                continue
            await asyncio.gather(*(self._one(e) for e in entries))

    async def _one(self, entry: Read) -> None:
        consumer = self._consumer
        if isinstance(entry, Malformed):
            await self._bury(entry, entry.reason)
            return
        if not consumer.knows(entry.topic):
            await self._bury(entry, f"no handler for topic {entry.topic!r}")
            return

        async def finish() -> None:
            await self.reader.done(entry)

        received = Received(
            id=entry.id,
            topic=entry.topic,
            payload=entry.payload,
            headers=entry.headers,
            key=entry.key,
            attempt=entry.attempt,
            producer=entry.producer,
        )
        await consumer.process(received, finish)

    async def _bury(self, entry: Entry | Malformed, reason: str) -> None:
        """Move an entry no handler can take to the dead stream, as the AMQP path rejects
        such a delivery to the group's ``.dlq``; the service redelivers its message until
        it is acked or dies, also as with AMQP."""
        id = entry.fields.get("id")
        try:
            await self.reader.bury(entry, reason)
        except REDIS_ERRORS as exc:  # left in its shard: reclaimed and buried again
            log.warning("consumer %s: could not bury %s (%s)", self._consumer.group, id, exc)
            return
        log.error(
            "consumer %s: rejected fallback entry %s (message %s) to %s: %s",
            self._consumer.group,
            entry.entry_id,
            id,
            self.reader.dead_key,
            reason,
            extra={"message_id": id},
        )

    async def _retrying(self, action: Callable[[], Awaitable[None]]) -> None:
        while not self._consumer.stopping:
            try:
                await action()
                return
            except REDIS_ERRORS as exc:
                log.warning("consumer %s: Redis unavailable (%s)", self._consumer.group, exc)
                await self._sleep(self._poll)

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


#: Ack errors that mean "not yet": the message was published by a confirm that has not
#: committed (or whose commit failed, until check-back confirms it again).
ACK_AGAIN = frozenset({"not_sent", "busy"})
#: Tries of such an ack, 0.2 s, 0.4 s, ... apart (about a minute in all), before the
#: service's redelivery is left to bring the message again.
MAX_ACK_TRIES = 25


class AckBatcher:
    """Acks handled messages to the service in batches, then each to RabbitMQ."""

    def __init__(self, client: ServiceClient, size: int, interval: float) -> None:
        self._client = client
        self._size = size
        self._interval = interval
        self._pending: list[tuple[str, Finish]] = []
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()
        self._closing = False
        #: Batches acked to the service so far.
        self.batches = 0
        self._tries: dict[str, int] = {}

    def add(self, id: str, finish: Finish) -> None:
        """Ack ``id`` to the service with the next batch, then call ``finish``."""
        self._pending.append((id, finish))
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
            await self.flush_now()
            if self._closing:
                return

    def _again(self, id: str) -> bool:
        """Count one more try of an ack the service could not take yet."""
        tries = self._tries[id] = self._tries.get(id, 0) + 1
        if tries > MAX_ACK_TRIES:
            del self._tries[id]
            return False
        return True

    async def flush_now(self) -> None:
        """Ack everything pending now; returns once a flush under way has finished too."""
        async with self._flushing:
            while self._pending:
                batch, self._pending = self._pending[: self._size], self._pending[self._size :]
                await self._flush(batch)

    async def _flush(self, batch: list[tuple[str, Finish]]) -> None:
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
        retry = set()
        for result in results:
            if result.error is None:
                self._tries.pop(result.id, None)
            elif result.error.code in ACK_AGAIN and self._again(result.id):
                retry.add(result.id)
            else:
                # Handled and in the inbox: a requeue or republish will be absorbed.
                log.warning(
                    "ack of %s: %s", result.id, result.error, extra={"message_id": result.id}
                )
        loop = asyncio.get_running_loop()
        ready = []
        for id, finish in batch:
            if id in retry:
                loop.call_later(self._tries[id] * 0.2, self._pending.append, (id, finish))
            else:
                ready.append((id, finish))
        await _release(ready)


#: Releases at the source in flight at once, after the service took their acks.
RELEASE_AT_ONCE = 64


async def _release(acked: list[tuple[str, Finish]]) -> None:
    """Release acked messages at their source, many at a time: awaited one by one, each
    AMQP ack costs a turn of the event loop for its frame, and that capped a consumer
    near a thousand messages a second."""
    for start in range(0, len(acked), RELEASE_AT_ONCE):
        chunk = acked[start : start + RELEASE_AT_ONCE]
        results = await asyncio.gather(*(finish() for _, finish in chunk), return_exceptions=True)
        for (id, _), result in zip(chunk, results, strict=True):
            if isinstance(result, Exception):  # the source went away: it delivers again
                log.info(
                    "release of %s at its source lost (%s)", id, result, extra={"message_id": id}
                )
            elif isinstance(result, BaseException):
                raise result
