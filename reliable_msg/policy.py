"""Pure policy: backoff, topic matching and validation of names. No I/O here."""

from __future__ import annotations

import random
import re
import zlib

_WORD = r"[A-Za-z0-9_\-]+"
#: A message topic: dot-separated words, e.g. ``order.paid``.
TOPIC_RE = re.compile(rf"^{_WORD}(\.{_WORD})*$")
#: A binding pattern: words, ``*`` (one word) or ``#`` (zero or more words).
PATTERN_RE = re.compile(rf"^({_WORD}|\*|#)(\.({_WORD}|\*|#))*$")
#: A message id: URL-safe and printable.
ID_RE = re.compile(r"^[A-Za-z0-9._:\-]+$")
#: A producer or group name: lower case, so that env variable names map to it.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,62}$")


def backoff(
    attempt: int,
    *,
    base: float,
    factor: float,
    cap: float,
    jitter: float = 0.0,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait after the ``attempt``-th try (1-based).

    ``base * factor**(attempt-1)``, capped at ``cap``, then spread by up to ``±jitter``
    (a fraction) so that a crowd of failures does not come back at the same instant.
    """
    if attempt < 1:
        raise ValueError("attempt starts at 1")
    exponent = min(attempt - 1, 64)  # factor**64 is beyond any sane cap already
    delay = min(cap, base * factor**exponent)
    if jitter:
        spread = (rng or random).uniform(-jitter, jitter)
        delay = max(0.0, delay * (1.0 + spread))
    return delay


def topic_matches(pattern: str, topic: str) -> bool:
    """AMQP topic-exchange matching: ``*`` is one word, ``#`` zero or more words."""
    return _match(pattern.split("."), topic.split("."))


def _match(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    return (head == "*" or head == words[0]) and _match(rest, words[1:])


def shard_of(key: str, shards: int) -> int:
    """The fallback shard of a message key (or id): stable across processes and hosts."""
    return zlib.crc32(key.encode()) % shards
