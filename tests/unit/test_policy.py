"""Pure policy: no I/O."""

from __future__ import annotations

import random

import pytest

from reliable_msg.policy import backoff, topic_matches


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 5.0), (50, 5.0), (10_000, 5.0)],
)
def test_backoff_grows_then_caps(attempt: int, expected: float) -> None:
    assert backoff(attempt, base=0.5, factor=2.0, cap=5.0) == expected


def test_backoff_jitter_stays_within_its_spread() -> None:
    rng = random.Random(7)
    delays = [backoff(3, base=1, factor=2, cap=100, jitter=0.25, rng=rng) for _ in range(500)]
    assert min(delays) >= 3.0 and max(delays) <= 5.0
    assert len(set(delays)) > 400  # actually spread, not one value


def test_backoff_rejects_attempt_zero() -> None:
    with pytest.raises(ValueError, match="starts at 1"):
        backoff(0, base=1, factor=2, cap=10)


@pytest.mark.parametrize(
    ("pattern", "topic", "matches"),
    [
        ("order.paid", "order.paid", True),
        ("order.paid", "order.created", False),
        ("order.*", "order.paid", True),
        ("order.*", "order.paid.late", False),
        ("order.#", "order", True),
        ("order.#", "order.paid.late", True),
        ("#", "anything.at.all", True),
        ("*.paid", "order.paid", True),
        ("*.paid", "paid", False),
        ("#.paid", "a.b.paid", True),
        ("#.paid", "a.b.paid.x", False),
        ("order.*.eu", "order.paid.eu", True),
    ],
)
def test_topic_matching_follows_amqp_topic_exchanges(
    pattern: str, topic: str, matches: bool
) -> None:
    assert topic_matches(pattern, topic) is matches
