"""The one decision of what becomes of a message the consumer received, whichever source
brought it (dramatiq's ``post_process_message``): :meth:`Settler.settle`.

============================  =======  ==================================================
what handling it came to      verdict  what is done
============================  =======  ==================================================
handled, or a duplicate       ACK      acked to the service with the next batch, then at
                                       the source (:mod:`.acks`)
Poison: no id, not JSON, or   DEAD     rejected at the source: RabbitMQ's ``.dlq``, the
no handler for its topic               Redis dead stream (the service redelivers it until
                                       it dies, and each copy is dead again)
its handler (or its           RETRY    released at the source now: the service, not the
transaction) raised                    source, redelivers it, with its backoff
cancelled: the consumer is    LEAVE    nothing: the source brings it again (RabbitMQ
stopping                               requeues it, a Redis entry is reclaimed)
============================  =======  ==================================================

An ACK the service cannot take yet (``not_sent``, ``busy``) is sent again by the batcher
(:data:`.acks.ACK_AGAIN`): that is carrying out the verdict, not another decision.
"""

from __future__ import annotations

from collections.abc import Awaitable
from enum import Enum

from ._log import log
from .acks import AckBatcher
from .message import Poison, Received
from .source import Source

#: What handling a message came to: handled (True), a duplicate (False), the
#: :class:`Poison` no handler can take, its handler's error, or ``CancelledError``.
Outcome = bool | BaseException


class Verdict(Enum):
    ACK = "ack"  #: handled (now or before): ack to the service, then at the source
    RETRY = "retry"  #: its handler failed: release at the source; the service redelivers
    DEAD = "dead"  #: no handler can ever take it: reject at the source
    LEAVE = "leave"  #: the consumer is stopping: leave it to the source


class Settler:
    """Settles the messages of one consumer group."""

    def __init__(self, group: str, acks: AckBatcher) -> None:
        self._group = group
        self._acks = acks

    async def settle(self, message: Received | Poison, outcome: Outcome, source: Source) -> Verdict:
        """Decide what becomes of ``message``, given what handling it came to, and have it
        done at ``source`` (see the module's table). ``message`` is what the source
        brought: the message, or the :class:`Poison` it could not read (then the outcome
        too)."""
        match message, outcome:
            case _, Poison() as poison:
                if await self._at_source(message.id, "rejection", source.reject(str(poison))):
                    log.error(
                        "consumer %s: rejected message %s (%s): %s",
                        self._group,
                        message.id or "without an id",
                        source.where,
                        poison,
                        extra={"message_id": message.id},
                    )
                return Verdict.DEAD
            case Received(), bool():
                self._acks.add(message.id, source)
                return Verdict.ACK
            case Received(), Exception() as error:
                log.error(
                    "consumer %s: handler of %s failed for message %s (attempt %d); "
                    "the service will redeliver it",
                    self._group,
                    message.topic,
                    message.id,
                    message.attempt,
                    exc_info=error,
                    extra={"message_id": message.id},
                )
                await self._at_source(message.id, "release", source.retry())
                return Verdict.RETRY
        log.info(
            "consumer %s: stopping; message %s is left to %s",
            self._group,
            message.id,
            source.where,
            extra={"message_id": message.id},
        )
        return Verdict.LEAVE

    async def _at_source(self, id: str, what: str, action: Awaitable[None]) -> bool:
        """Carry out a verdict at the source (True when done); if the source went away,
        it is its own to deliver the message again (RabbitMQ requeues, a Redis entry is
        reclaimed)."""
        try:
            await action
            return True
        except Exception as exc:
            log.warning(
                "consumer %s: %s of %s at its source lost (%s)",
                self._group,
                what,
                id,
                exc,
                extra={"message_id": id},
            )
            return False
