"""Stopping and restarting the real Redis of this machine."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from reliable_msg.harness import servers

#: Seconds Redis gets to answer again after a test stopped it.
COMEBACK = 30.0
#: Seconds its port gets to close after the shutdown.
STOP_WAIT = 10.0


def ensure_running() -> None:
    servers.start_redis(within=COMEBACK)


@contextlib.contextmanager
def stopped() -> Iterator[None]:
    """Redis shut down for the block, started again whatever happens."""
    servers.stop_redis(within=STOP_WAIT)
    try:
        yield
    finally:
        ensure_running()
