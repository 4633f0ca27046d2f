"""The :class:`Consumer`: one group's handlers, its run loop and its mode (which sources
it reads)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable, Sequence

import asyncpg

from reliable_msg import constants
from reliable_msg.aio import first_of
from reliable_msg.sdk.client import RetryPolicy, ServiceClient
from reliable_msg.transports.nodes import amqp_nodes
from reliable_msg.transports.switch import Mode

from ._log import log
from .acks import AckBatcher
from .amqp import QueueReader
from .fallback import FallbackDrain
from .inbox import Inbox
from .message import Handler, Poison, Received
from .settle import Outcome, Settler
from .source import Source

#: Seconds a stopping consumer waits at most for the service to take its last acks.
STOP_TIMEOUT = 10.0

_SOURCE = {Mode.NORMAL: "RabbitMQ", Mode.DEGRADED: "the Redis fallback shards"}


class Consumer:
    """Consumes one group's messages and hands each to the handler of its topic.

    Normally from the group's RabbitMQ queue. With ``redis_url`` it also follows the
    degradation switch (README: When RabbitMQ is down): when the switch is on it keeps its
    RabbitMQ consumer while that still works, and starts ``redis_workers`` workers over the group's
    fallback shards; after the switch clears, the workers drain the shards until they are
    empty, and only then does the consumer go back to RabbitMQ alone (reconnecting to it
    if it had lost it). Every path uses the same handler, inbox and acks. The group's
    shard count is the one the service records in Redis; ``shards`` holds until it has.
    ``redis_url`` is the service's: one Redis (``redis://host:port/db``) or a Redis Cluster
    by its nodes (``redis+cluster://[user:password@]host:port,host:port...``); a URL of
    neither form is a ValueError here.

    ``amqp_url`` is one RabbitMQ URL or the nodes of one cluster: a list of URLs, or one
    string of them separated by commas. The consumer attaches through the first node,
    and after a failed attach or a lost connection through the next one in turn.
    """

    def __init__(
        self,
        group: str,
        *,
        service_url: str | Sequence[str],
        token: str,
        amqp_url: str | Sequence[str],
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
        self._handlers: dict[str, Handler] = {}
        #: ``concurrency`` handler transactions at once, each of up to ``handle_batch``
        #: messages; the messages in hand are bounded by ``prefetch`` (and, from Redis, by
        #: the workers' reads).
        self._inbox = Inbox(group, pool, self._handlers, concurrency, handle_batch)
        self.acks = AckBatcher(self._client, ack_batch, ack_interval)
        self._settler = Settler(group, self.acks)
        self._stopping = asyncio.Event()
        self._stop_timeout = stop_timeout
        #: When the acks at stop give up (monotonic), set by the first wait for them.
        self._give_up_at: float | None = None
        self.mode = Mode.NORMAL  #: DEGRADED while the fallback workers run
        self._mode_changed = asyncio.Event()
        #: the RabbitMQ nodes, in the order attaches try them
        self.amqp_urls = amqp_nodes(amqp_url)
        self._rabbitmq = QueueReader(self, self.amqp_urls, prefetch)
        self._fallback = (
            FallbackDrain(
                self,
                redis_url,
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
        tasks = [asyncio.create_task(self._rabbitmq.run())]
        if self._fallback is not None:
            tasks.append(asyncio.create_task(self._fallback.run()))
        try:
            await self._stopping.wait()
            await asyncio.gather(*tasks)
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

    # -- each message, from either source -----------------------------------------------

    async def consume(self, message: Received | Poison, source: Source) -> None:
        """Handle what ``source`` brought (unless it is the :class:`Poison` the source
        could not read), then settle it there: the one way in for both sources."""
        outcome: Outcome
        if isinstance(message, Poison):
            outcome = message
        else:
            try:
                outcome = await self.handle(message)
            except asyncio.CancelledError as stopping:
                await self._settler.settle(message, stopping, source)
                raise
            except Exception as exc:
                outcome = exc
        await self._settler.settle(message, outcome, source)

    async def handle(self, received: Received) -> bool:
        """Run the handler with the inbox row in one transaction, which it may share with
        other messages; returns after the commit; False if it was a duplicate (already
        handled, nothing done). Raises :class:`Poison` when its topic has no handler."""
        if received.topic not in self._handlers:
            raise Poison(f"no handler for topic {received.topic!r}", id=received.id)
        return await self._inbox.handle(received)

    # -- for the sources ----------------------------------------------------------------

    async def wait_stopping(self) -> None:
        """Return once asked to stop."""
        await self._stopping.wait()

    async def wait_normal(self) -> bool:
        """Wait until the mode is normal again; False if stopping first."""
        while self.mode is Mode.DEGRADED and not self.stopping:
            self._mode_changed.clear()
            await first_of(self._stopping.wait(), self._mode_changed.wait())
        return not self.stopping

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if asked to stop meanwhile."""
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass

    async def flush_acks(self) -> None:
        """Ack now whatever waits in the batcher, within what is left of the stop timeout."""
        await self._bounded(self.acks.flush_now())

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
