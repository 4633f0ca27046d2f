"""Where a received message came from, and what can be done with it there: the one
interface of the consumer's two sources, RabbitMQ (:mod:`.amqp`) and the Redis fallback
shards (:mod:`.fallback`). Which of the three happens is decided in :mod:`.settle`; a
source only carries it out."""

from __future__ import annotations

from typing import Protocol


class Source(Protocol):
    """One received message, at the source that brought it."""

    @property
    def where(self) -> str:
        """Where the message is, for logs."""
        ...

    async def ack(self) -> None:
        """It is handled and the service has the ack: release it; the source does not
        bring it again."""
        ...

    async def retry(self) -> None:
        """Its handler failed: release it all the same, since the service, not the
        source, owns the retry and its backoff, and redelivers it."""
        ...

    async def reject(self, reason: str) -> None:
        """No handler can ever take it: move it, with ``reason``, to the group's dead
        letters at this source."""
        ...
