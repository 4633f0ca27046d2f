"""The state machine of messages and deliveries, in one place.

Every move in the store is a guarded update (``... WHERE status = <from>``) built from
the tables below, so two instances, a late request and a scanner can never move a
message backwards or twice.
"""

from __future__ import annotations

from enum import StrEnum

from reliable_msg.errors import ReliableMsgError


class MessageStatus(StrEnum):
    #: Stored by prepare; the producer's local transaction has not reported yet.
    PENDING = "pending"
    #: The local transaction committed and the broker confirmed the publish.
    SENT = "sent"
    #: Every delivery was acked by its consumer group.
    DONE = "done"
    #: The local transaction failed; the message will never be delivered.
    CANCELLED = "cancelled"
    #: Check-back or a delivery exhausted its tries; an operator must requeue it.
    DEAD = "dead"


class DeliveryStatus(StrEnum):
    #: Published to the group's queue, not yet acked.
    SENT = "sent"
    #: Acked by the group's consumer.
    DONE = "done"
    #: Redelivered ``max_attempts`` times without an ack.
    DEAD = "dead"


M = MessageStatus
D = DeliveryStatus

#: Every move a message may make, and what makes it.
MESSAGE_TRANSITIONS: dict[tuple[MessageStatus, MessageStatus], str] = {
    (M.PENDING, M.SENT): "confirm, or a check-back answered committed",
    (M.PENDING, M.CANCELLED): "cancel, or a check-back answered rolled_back",
    (M.PENDING, M.DEAD): "check-back exhausted",
    (M.SENT, M.DONE): "the last delivery acked",
    (M.SENT, M.DEAD): "a delivery exhausted its redeliveries",
    (M.DEAD, M.SENT): "requeue of a message whose delivery died",
    (M.DEAD, M.PENDING): "requeue of a message whose check-back died: ask the producer again",
}

#: Every move a delivery may make, and what makes it.
DELIVERY_TRANSITIONS: dict[tuple[DeliveryStatus, DeliveryStatus], str] = {
    (D.SENT, D.DONE): "ack",
    (D.SENT, D.DEAD): "redeliveries exhausted",
    (D.DEAD, D.SENT): "requeue",
}

#: Statuses a message never leaves except by purge.
FINAL: frozenset[MessageStatus] = frozenset({M.DONE, M.CANCELLED})


class IllegalTransition(ReliableMsgError):
    """A move that the tables above do not allow; a programming error."""


def message_move(src: MessageStatus, dst: MessageStatus) -> tuple[str, str]:
    """Return ``(src, dst)`` as SQL parameters, refusing a move the machine forbids."""
    if (src, dst) not in MESSAGE_TRANSITIONS:
        raise IllegalTransition(f"message {src} -> {dst}")
    return src.value, dst.value


def delivery_move(src: DeliveryStatus, dst: DeliveryStatus) -> tuple[str, str]:
    """Return ``(src, dst)`` as SQL parameters, refusing a move the machine forbids."""
    if (src, dst) not in DELIVERY_TRANSITIONS:
        raise IllegalTransition(f"delivery {src} -> {dst}")
    return src.value, dst.value
