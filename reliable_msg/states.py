"""The state machine of messages and deliveries, in one place.

Every move in the store is a guarded update (``... WHERE status = <from>``) built from
the named moves below, so two instances, a late request and a scanner can never move a
message backwards or twice. A statement that moves only some of the rows it touches
(the last ack finishes a message, the others do not) takes its condition from the move
(:attr:`Move.when`, :meth:`Move.applies`), not from SQL of its own.

Messages (deliveries are simpler: sent -> done by ack, sent -> dead, dead -> sent)::

    prepare -> pending --confirm--> sent --finish (last ack)--> done
               |  |  ^               |
         cancel|  |  '--check again  '--delivery died--> dead --requeue--> sent
               v  '-----give up----------------------->  dead --requeue--> pending
           cancelled

A ``dead`` message goes back to where it died from (:func:`died_from`): ``pending`` when
it was never sent (check-back gave up, or the broker refused its first publish for
good), ``sent`` when a delivery died.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Generic, TypeVar

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

#: Any status enum: these messages' and their deliveries', and the TCC coordinator's.
S = TypeVar("S", bound=StrEnum)


@dataclass(frozen=True, slots=True)
class Move(Generic[S]):
    """One allowed move, ``src`` → ``dst``, and what makes it."""

    src: S
    dst: S
    why: str
    #: For a move a statement makes on some of its rows only: the SQL condition on the
    #: row (its columns unqualified) that makes it; empty when the WHERE decides.
    when: str = ""

    @property
    def params(self) -> tuple[str, str]:
        """``(src, dst)`` as SQL parameters."""
        return self.src.value, self.dst.value

    @property
    def recorded(self) -> bool:
        """Whether the history records it: a move that keeps the status does not."""
        return self.src is not self.dst

    def applies(self) -> str:
        """The SQL condition under which a row makes this move (guard included)."""
        guard = f"status = '{self.src.value}'"
        return f"{guard} AND {self.when}" if self.when else guard


# -- messages ------------------------------------------------------------------------------

#: Confirm by the producer, or check-back answered committed, and the broker took it.
CONFIRM = Move(M.PENDING, M.SENT, "confirm, or a check-back answered committed")
#: Cancel by the producer, or check-back answered rolled_back.
CANCEL = Move(M.PENDING, M.CANCELLED, "cancel, or a check-back answered rolled_back")
#: A check-back got no answer (or ``unknown``) with tries left: counted, and the message
#: is asked about again after a backoff. It keeps its status, so the history skips it.
CHECK_AGAIN = Move(M.PENDING, M.PENDING, "check-back without an answer: ask again later")
#: Check-back exhausted its tries, or the broker refused the first publish for good.
GIVE_UP = Move(M.PENDING, M.DEAD, "check-back exhausted, or the broker refused it")
#: The ack of the message's last remaining delivery (``remaining`` counts the deliveries
#: not yet done: confirm sets it, each ack takes one).
FINISH = Move(M.SENT, M.DONE, "the last delivery acked", when="remaining = 1")
#: One of its deliveries exhausted its redeliveries.
DELIVERY_DIED = Move(M.SENT, M.DEAD, "a delivery exhausted its redeliveries")
#: Requeue of a message whose delivery died: its dead deliveries are published again.
REQUEUE_SENT = Move(M.DEAD, M.SENT, "requeue of a message whose delivery died")
#: Requeue of a message that died before it was sent: only the producer knows whether
#: it committed, so check-back starts again.
REQUEUE_PENDING = Move(M.DEAD, M.PENDING, "requeue of a message never sent: ask the producer")

MESSAGE_MOVES: tuple[Move[MessageStatus], ...] = (
    CONFIRM,
    CANCEL,
    CHECK_AGAIN,
    GIVE_UP,
    FINISH,
    DELIVERY_DIED,
    REQUEUE_SENT,
    REQUEUE_PENDING,
)

# -- deliveries ----------------------------------------------------------------------------

#: The group's consumer acked it.
ACK = Move(D.SENT, D.DONE, "ack")
#: Not acked in time and republished, or a republish the broker did not take: tried
#: again later. It keeps its status; the history records the republish only.
REDELIVER = Move(D.SENT, D.SENT, "redelivered, or a redelivery to try again later")
#: Out of attempts, or refused by the broker ``max_refusals`` times in a row.
EXHAUSTED = Move(D.SENT, D.DEAD, "redeliveries exhausted")
#: Requeue by an operator: a fresh budget.
REQUEUE_DELIVERY = Move(D.DEAD, D.SENT, "requeue")

DELIVERY_MOVES: tuple[Move[DeliveryStatus], ...] = (ACK, REDELIVER, EXHAUSTED, REQUEUE_DELIVERY)


def transitions(moves: tuple[Move[S], ...]) -> dict[tuple[S, S], str]:
    """``(src, dst)`` -> what makes it; the reasons of moves sharing a pair joined."""
    table: dict[tuple[S, S], str] = {}
    for move in moves:
        key = (move.src, move.dst)
        table[key] = "; ".join(filter(None, (table.get(key), move.why)))
    return table


#: Every move a message may make, and what makes it.
MESSAGE_TRANSITIONS: dict[tuple[MessageStatus, MessageStatus], str] = transitions(MESSAGE_MOVES)

#: Every move a delivery may make, and what makes it.
DELIVERY_TRANSITIONS: dict[tuple[DeliveryStatus, DeliveryStatus], str] = transitions(DELIVERY_MOVES)

#: Statuses a message never leaves except by purge.
FINAL: frozenset[MessageStatus] = frozenset({M.DONE, M.CANCELLED})


class IllegalTransition(ReliableMsgError):
    """A move that the tables above do not allow; a programming error."""


def checked(table: dict[tuple[S, S], str], what: str, src: S, dst: S) -> tuple[str, str]:
    """Return ``(src, dst)`` as SQL parameters, refusing a move ``table`` forbids."""
    if (src, dst) not in table:
        raise IllegalTransition(f"{what} {src} -> {dst}")
    return src.value, dst.value


def message_move(src: MessageStatus, dst: MessageStatus) -> tuple[str, str]:
    return checked(MESSAGE_TRANSITIONS, "message", src, dst)


def delivery_move(src: DeliveryStatus, dst: DeliveryStatus) -> tuple[str, str]:
    return checked(DELIVERY_TRANSITIONS, "delivery", src, dst)


def died_from(sent_at: datetime | None) -> MessageStatus:
    """The status a ``dead`` message died from: ``pending`` (:data:`GIVE_UP`) when it
    was never sent, ``sent`` (:data:`DELIVERY_DIED`) otherwise. ``sent_at`` is set by
    :data:`CONFIRM` and never cleared, so it tells the two apart with no column of its
    own."""
    return M.PENDING if sent_at is None else M.SENT


def requeue_move(sent_at: datetime | None) -> Move[MessageStatus]:
    """How a ``dead`` message comes back: to the status it died from."""
    return REQUEUE_PENDING if died_from(sent_at) is M.PENDING else REQUEUE_SENT
