"""The consumer's Redis fallback source: workers over the group's fallback shards while
the degradation switch is on and until the shards are empty (:class:`FallbackDrain`),
and each entry read as a :class:`~.source.Source`."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from reliable_msg.aio import stop_task
from reliable_msg.errors import FallbackUnavailable
from reliable_msg.transports.redis import FallbackReader, Malformed, Read
from reliable_msg.transports.redis_client import redis_client
from reliable_msg.transports.switch import Mode, Switch

from ._log import log
from .message import Poison, Received

if TYPE_CHECKING:
    from .consumer import Consumer


#: Seconds one Redis call of the fallback workers may take.
REDIS_TIMEOUT = 5.0


class FallbackDrain:
    """A consumer's workers over its group's Redis fallback shards: they hand each entry
    to :meth:`Consumer.consume <.consumer.Consumer.consume>`."""

    def __init__(
        self,
        consumer: Consumer,
        redis_url: str,
        *,
        namespace: str,
        shards: int,
        workers: int,
        poll_interval: float,
        claim_idle: float,
        dead_maxlen: int,
    ) -> None:
        self._consumer = consumer
        # Bounded calls: a Redis that hangs must not hang the workers (reads never block
        # on the server side).
        self._redis = redis_client(
            redis_url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT
        )
        name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.reader = FallbackReader(
            self._redis,
            namespace=namespace,
            group=consumer.group,
            shards=shards,
            consumer=name,
            dead_maxlen=dead_maxlen,
        )
        self.switch = Switch(
            self._redis,
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
        except FallbackUnavailable:
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
        except FallbackUnavailable:
            return False
        return self.reader.keys != keys

    async def _empty(self) -> bool:
        try:
            return await self.reader.depth() == 0
        except FallbackUnavailable:
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
            except FallbackUnavailable as exc:
                log.warning("consumer %s: Redis unavailable (%s)", self._consumer.group, exc)
                await self._sleep(self._poll)
                continue
            if not entries:
                await self._sleep(0.05)
                continue
            await asyncio.gather(*(self._one(e) for e in entries))

    async def _one(self, entry: Read) -> None:
        source = FallbackSource(self.reader, entry)
        await self._consumer.consume(received(entry), source)

    async def _retrying(self, action: Callable[[], Awaitable[None]]) -> None:
        while not self._consumer.stopping:
            try:
                await action()
                return
            except FallbackUnavailable as exc:
                log.warning("consumer %s: Redis unavailable (%s)", self._consumer.group, exc)
                await self._sleep(self._poll)

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class FallbackSource:
    """An entry of a fallback shard, settled in its stream."""

    def __init__(self, reader: FallbackReader, entry: Read) -> None:
        self._reader = reader
        self.entry = entry

    @property
    def where(self) -> str:
        return f"fallback entry {self.entry.entry_id} of {self.entry.stream}"

    async def ack(self) -> None:
        await self._reader.done(self.entry)

    async def retry(self) -> None:
        # The service redelivers it, through RabbitMQ or the shards, with its backoff.
        await self._reader.done(self.entry)

    async def reject(self, reason: str) -> None:
        # To the dead stream, as RabbitMQ dead-letters a rejected delivery to the .dlq; a
        # failure leaves it in its shard, to be reclaimed and rejected again.
        await self._reader.bury(self.entry, reason)


def received(entry: Read) -> Received | Poison:
    """The entry as a handler sees it, or the :class:`Poison` no handler can take."""
    if isinstance(entry, Malformed):
        return Poison(entry.reason, id=entry.fields.get("id", ""))
    return Received(
        id=entry.id,
        topic=entry.topic,
        payload=entry.payload,
        headers=entry.headers,
        key=entry.key,
        attempt=entry.attempt,
        producer=entry.producer,
    )
