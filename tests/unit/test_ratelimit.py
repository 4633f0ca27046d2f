"""The API's token buckets, on a clock the test moves: no I/O, no sleeping."""

from __future__ import annotations

import pytest

from reliable_msg.service.ratelimit import RateLimiter
from reliable_msg.service.settings import LimitSettings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_full_bucket_takes_a_burst_then_refuses_with_the_wait() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=4.0, burst=3, clock=clock)
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.25)
    clock.now += 0.125
    assert limiter.take("a") == pytest.approx(0.125)  # a refusal takes no token
    clock.now += 0.125
    assert limiter.take("a") == 0.0
    assert limiter.take("a") > 0.0


def test_requests_at_the_rate_are_never_refused() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=8.0, burst=1, clock=clock)
    for _ in range(1000):
        assert limiter.take("a") == 0.0
        clock.now += 0.125


def test_a_quiet_bucket_refills_up_to_the_burst_only() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=10.0, burst=2, clock=clock)
    limiter.take("a")
    clock.now += 3600
    assert [limiter.take("a") for _ in range(3)][-1] > 0.0


def test_each_key_has_its_own_bucket() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, clock=Clock())
    assert limiter.take("producer order") == 0.0
    assert limiter.take("producer order") > 0.0
    assert limiter.take("producer other") == 0.0
    assert limiter.take("address 10.0.0.1") == 0.0


def test_only_the_most_recent_keys_are_kept() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, max_keys=2, clock=Clock())
    for key in ("a", "b", "a", "c"):  # "b" is the least recently used when "c" comes
        limiter.take(key)
    assert limiter.take("a") > 0.0
    assert limiter.take("c") > 0.0
    assert limiter.take("b") == 0.0  # dropped, so back full


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (-1.0, 1), (1.0, 0)])
def test_a_limit_that_takes_nothing_is_refused(rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match="rate > 0"):
        RateLimiter(rate, burst)


@pytest.mark.parametrize(
    ("limits", "enabled", "bucket"),
    [
        (LimitSettings(), False, 1),
        (LimitSettings(rate=100.0), True, 100),
        (LimitSettings(rate=0.5), True, 1),
        (LimitSettings(rate=2.5, burst=10), True, 10),
    ],
)
def test_limit_settings(limits: LimitSettings, enabled: bool, bucket: int) -> None:
    assert limits.enabled is enabled
    assert limits.bucket == bucket


def test_wait_tells_without_taking() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=0.5, burst=2, clock=clock)
    assert limiter.wait("a") == 0.0
    assert limiter.wait("a") == 0.0  # nothing was taken
    assert [limiter.take("a"), limiter.take("a")] == [0.0, 0.0]
    assert limiter.wait("a") == pytest.approx(2.0)
    clock.now += 1.5
    assert limiter.wait("a") == pytest.approx(0.5)
    clock.now += 0.5
    assert limiter.wait("a") == 0.0
    assert limiter.wait("b") == 0.0
