"""The API's rate limit: a token bucket per credential, in the memory of one instance.

Each bucket holds up to ``burst`` tokens and refills at ``rate`` tokens a second; a
request takes one token, and a request that finds none is refused with the time until
the next token. Buckets are kept for the most recently seen ``max_keys`` credentials
only, so that requests from ever new client addresses cannot grow memory without bound;
a bucket dropped that way comes back full.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

#: Buckets kept at most, least recently used dropped first.
MAX_KEYS = 10_000


class RateLimiter:
    """Token buckets keyed by credential."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_keys: int = MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a rate limit needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._max_keys = max_keys
        self._clock = clock
        # key -> (tokens left, when they were counted)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float:
        """Take a token from ``key``'s bucket: 0.0 when there was one, else the seconds
        until there will be one (nothing is taken then)."""
        tokens, now = self._refilled(key)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return wait

    def wait(self, key: str) -> float:
        """The seconds until ``key``'s bucket has a token (0.0: it has one); takes none."""
        tokens, _ = self._refilled(key, keep=False)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def _refilled(self, key: str, *, keep: bool = True) -> tuple[float, float]:
        now = self._clock()
        if keep:
            tokens, then = self._buckets.pop(key, (float(self.burst), now))
        else:
            tokens, then = self._buckets.get(key, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - then) * self.rate), now
