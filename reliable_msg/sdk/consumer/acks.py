"""Acks of handled messages: to the service in batches, then each at its source.

:mod:`.settle` hands each message it decided to ack to :class:`AckBatcher`; the batcher
carries that out: it acks the batch to the service, tries again later an ack the service
cannot take yet (:data:`ACK_AGAIN`), and releases the rest at their sources, whatever the
service answered, since a handled message has its inbox row and a copy of it is absorbed.
"""

from __future__ import annotations

import asyncio

from reliable_msg.errors import Code, ReliableMsgError
from reliable_msg.sdk.client import ServiceClient

from ._log import log
from .source import Source

#: Ack errors that mean "not yet": the message was published by a confirm that has not
#: committed (or whose commit failed, until check-back confirms it again).
ACK_AGAIN = frozenset({Code.NOT_SENT, Code.BUSY})
#: Tries of such an ack, 0.2 s, 0.4 s, ... apart (about a minute in all), before the
#: service's redelivery is left to bring the message again.
MAX_ACK_TRIES = 25
#: Releases at the source in flight at once, after the service took their acks.
RELEASE_AT_ONCE = 64


class AckBatcher:
    """Acks handled messages to the service in batches, then each at its source."""

    def __init__(self, client: ServiceClient, size: int, interval: float) -> None:
        self._client = client
        self._size = size
        self._interval = interval
        self._pending: list[tuple[str, Source]] = []
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()
        self._closing = False
        #: Batches acked to the service so far.
        self.batches = 0
        self._tries: dict[str, int] = {}

    def add(self, id: str, source: Source) -> None:
        """Ack ``id`` to the service with the next batch, then at ``source``."""
        self._pending.append((id, source))
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

    async def _flush(self, batch: list[tuple[str, Source]]) -> None:
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
        for id, source in batch:
            if id in retry:
                loop.call_later(self._tries[id] * 0.2, self._pending.append, (id, source))
            else:
                ready.append((id, source))
        await release(ready)


async def release(acked: list[tuple[str, Source]]) -> None:
    """Ack messages the service took at their sources, many at a time: awaited one by
    one, each AMQP ack costs a turn of the event loop for its frame, and that capped a
    consumer near a thousand messages a second."""
    for start in range(0, len(acked), RELEASE_AT_ONCE):
        chunk = acked[start : start + RELEASE_AT_ONCE]
        results = await asyncio.gather(
            *(source.ack() for _, source in chunk), return_exceptions=True
        )
        for (id, _), result in zip(chunk, results, strict=True):
            if isinstance(result, Exception):  # the source went away: it delivers again
                log.info(
                    "release of %s at its source lost (%s)", id, result, extra={"message_id": id}
                )
            elif isinstance(result, BaseException):
                raise result
