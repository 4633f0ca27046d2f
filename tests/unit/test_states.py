"""The state machine tables and their guard."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest

from reliable_msg.states import (
    CHECK_AGAIN,
    CONFIRM,
    DELIVERY_MOVES,
    DELIVERY_TRANSITIONS,
    FINISH,
    MESSAGE_MOVES,
    MESSAGE_TRANSITIONS,
    REDELIVER,
    REQUEUE_PENDING,
    REQUEUE_SENT,
    DeliveryStatus,
    IllegalTransition,
    MessageStatus,
    Move,
    delivery_move,
    died_from,
    message_move,
    requeue_move,
)

M = MessageStatus


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(MessageStatus, repeat=2)))
def test_message_moves_are_exactly_the_table(src: MessageStatus, dst: MessageStatus) -> None:
    if (src, dst) in MESSAGE_TRANSITIONS:
        assert message_move(src, dst) == (src.value, dst.value)
    else:
        with pytest.raises(IllegalTransition):
            message_move(src, dst)


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(DeliveryStatus, repeat=2)))
def test_delivery_moves_are_exactly_the_table(src: DeliveryStatus, dst: DeliveryStatus) -> None:
    if (src, dst) in DELIVERY_TRANSITIONS:
        assert delivery_move(src, dst) == (src.value, dst.value)
    else:
        with pytest.raises(IllegalTransition):
            delivery_move(src, dst)


def test_no_message_ever_moves_back_to_pending_except_by_requeue() -> None:
    into_pending = [src for src, dst in MESSAGE_TRANSITIONS if dst is M.PENDING and src != dst]
    assert into_pending == [M.DEAD]


def test_only_the_moves_that_keep_the_status_go_unrecorded() -> None:
    assert [m for m in MESSAGE_MOVES if not m.recorded] == [CHECK_AGAIN]
    assert [m for m in DELIVERY_MOVES if not m.recorded] == [REDELIVER]


@pytest.mark.parametrize(
    ("sent_at", "died", "back"),
    [(None, M.PENDING, REQUEUE_PENDING), (datetime.now(UTC), M.SENT, REQUEUE_SENT)],
)
def test_a_dead_message_goes_back_to_where_it_died_from(
    sent_at: datetime | None, died: MessageStatus, back: Move[MessageStatus]
) -> None:
    assert died_from(sent_at) is died
    assert requeue_move(sent_at) is back
    assert (back.src, back.dst) == (M.DEAD, died)
    assert (died, M.DEAD) in MESSAGE_TRANSITIONS


def test_the_last_ack_is_the_one_conditional_move_and_carries_its_guard() -> None:
    assert [m for m in MESSAGE_MOVES if m.when] == [FINISH]
    assert FINISH.applies() == "status = 'sent' AND remaining = 1"
    assert CONFIRM.applies() == "status = 'pending'"


def test_finished_messages_never_move() -> None:
    assert not [t for t in MESSAGE_TRANSITIONS if t[0] in (M.DONE, M.CANCELLED)]
