"""The state machine tables and their guard."""

from __future__ import annotations

import itertools

import pytest

from reliable_msg.states import (
    DELIVERY_TRANSITIONS,
    MESSAGE_TRANSITIONS,
    DeliveryStatus,
    IllegalTransition,
    MessageStatus,
    delivery_move,
    message_move,
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
    into_pending = [src for src, dst in MESSAGE_TRANSITIONS if dst is M.PENDING]
    assert into_pending == [M.DEAD]


def test_finished_messages_never_move() -> None:
    assert not [t for t in MESSAGE_TRANSITIONS if t[0] in (M.DONE, M.CANCELLED)]
