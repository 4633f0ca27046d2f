"""A message's history: the moves ``rmsg_transition`` records, merged with those its rows
record already.

The moves every message makes (prepare, the producer's confirm, each group's ack and the
last ack that finishes it) write no history row: ``created_at``, ``sent_at``, each
delivery's ``done_at`` and ``finished_at`` say when they happened, and each is made at
most once (none of them is ever cleared or set again). Every other move (cancel,
check-back's answers and exhaustion, refused publishes, redelivery, dead deliveries,
requeue) keeps its row, with its reason. Rows an older version wrote for the derived
moves stay valid: a move is derived only when no row records it.

Rows are in the order they were written (their moves lock the message or the delivery);
each derived move goes where its row lock put it:

- prepare first: it created the message;
- the confirm after the last move in or out of ``pending`` (the message never returns
  there once sent: ``sent_at`` is set once) and before everything else;
- an ack after every earlier move and every move of its own group (its delivery is
  ``done`` for good), between the others by time;
- the ack that finished the message, then the finish, last: ``done`` is final.
"""

from __future__ import annotations

from collections.abc import Sequence

from reliable_msg.message import Message, Transition
from reliable_msg.states import ACK, CONFIRM, FINISH, M

#: The reasons derived moves show, as their rows said.
PREPARE_REASON = "prepare"
CONFIRM_REASON = "confirm"
ACK_REASON = "ack"
FINISH_REASON = "last delivery acked"

#: (group, from, to) of a recorded move: what decides whether a move is derived.
_Key = tuple[str | None, str | None, str]

_PREPARED: _Key = (None, None, M.PENDING.value)
_CONFIRMED: _Key = (None, *CONFIRM.params)
_ACKED = ACK.params
_FINISHED: _Key = (None, *FINISH.params)


def merged(recorded: Sequence[Transition], message: Message) -> list[Transition]:
    """The history of ``message`` (with its deliveries): ``recorded`` (its rows, in
    order) with the moves its rows record and no row does."""
    have = {_key(t) for t in recorded}
    moves = list(recorded)
    if _PREPARED not in have:
        moves.insert(0, Transition(*_PREPARED, message.created_at, PREPARE_REASON))
    if message.sent_at is not None and _CONFIRMED not in have:
        confirm = Transition(*_CONFIRMED, message.sent_at, CONFIRM_REASON)
        moves.insert(_after_pending(moves), confirm)
    acks = sorted(
        (
            Transition(d.group, *_ACKED, d.done_at, ACK_REASON)
            for d in message.deliveries
            if d.done_at is not None and (d.group, *_ACKED) not in have
        ),
        key=lambda t: (t.at, t.group_name or ""),
    )
    last: list[Transition] = []
    if message.status is M.DONE and message.finished_at is not None and _FINISHED not in have:
        # Its ack made the same transaction: the last derived ack of that time.
        finishing = [a for a in acks if a.at == message.finished_at][-1:]
        last = [*finishing, Transition(*_FINISHED, message.finished_at, FINISH_REASON)]
        acks = [a for a in acks if a not in finishing]
    for a in acks:
        moves.insert(_ack_place(moves, a), a)
    return moves + last


def _key(t: Transition) -> _Key:
    return (t.group_name, t.from_status, t.to_status)


def _after_pending(moves: Sequence[Transition]) -> int:
    """Where the confirm goes: after the message's last move in or out of pending."""
    pending = M.PENDING.value
    return 1 + max(
        (
            i
            for i, t in enumerate(moves)
            if t.group_name is None and pending in (t.from_status, t.to_status)
        ),
        default=-1,
    )


def _ack_place(moves: Sequence[Transition], ack: Transition) -> int:
    """Where a derived ack goes: after the confirm, every move of its group and every
    move no later than itself."""
    return 1 + max(
        (
            i
            for i, t in enumerate(moves)
            if t.group_name == ack.group_name or t.at <= ack.at or _key(t) == _CONFIRMED
        ),
        default=-1,
    )
