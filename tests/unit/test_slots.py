"""The check-back scanner's call slots: a global bound and a bound per producer."""

from __future__ import annotations

import pytest

from reliable_msg.service.scanners import Slots


def test_a_producer_takes_at_most_its_share() -> None:
    slots = Slots(total=4, per_producer=2)
    assert [slots.take("a") for _ in range(3)] == [True, True, False]
    assert slots.free == 2
    assert slots.full() == ["a"]
    assert slots.take("b")
    assert slots.full() == ["a"]


def test_the_total_bounds_every_producer_together() -> None:
    slots = Slots(total=3, per_producer=2)
    assert slots.take("a") and slots.take("b") and slots.take("c")
    assert slots.free == 0
    assert not slots.take("d")
    assert slots.full() == []  # no producer is at its share; the instance is


def test_a_slot_given_back_is_free_again() -> None:
    slots = Slots(total=2, per_producer=1)
    assert slots.take("a")
    assert not slots.take("a")
    slots.give_back("a")
    assert slots.free == 2
    assert slots.full() == []
    assert slots.take("a")


@pytest.mark.parametrize(("total", "per_producer", "share"), [(4, 8, 4), (8, 2, 2), (1, 1, 1)])
def test_the_share_is_never_more_than_the_total(total: int, per_producer: int, share: int) -> None:
    slots = Slots(total, per_producer)
    assert slots.per_producer == share
    assert sum(slots.take("a") for _ in range(total + 1)) == share
