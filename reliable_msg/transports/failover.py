"""A robust connection to the nodes of one RabbitMQ cluster: each connection attempt,
the first and every reconnection, goes to the next node in turn.

aio-pika's :class:`~aio_pika.RobustConnection` reconnects to its one URL; every attempt
goes through its private ``__connect_transport``, so :class:`NodesConnection` overrides
that one method to point ``url`` at the next node first, and keeps the rest: the
restored channels, the ``reconnect_callbacks``. aio-pika is pinned below 11 for it, and
this module refuses to load if the hook is gone (a test checks that it is called).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

from aio_pika import RobustConnection
from yarl import URL

from reliable_msg.transports.nodes import where

log = logging.getLogger(__name__)

_HOOK = "_RobustConnection__connect_transport"
_base_connect = getattr(RobustConnection, _HOOK, None)
if _base_connect is None:  # pragma: no cover - only with an aio-pika we do not support
    raise ImportError(f"aio_pika.RobustConnection has no {_HOOK}: see {__name__}")
_connect_transport = cast(Callable[[RobustConnection], Awaitable[None]], _base_connect)


class Cursor:
    """Which node comes next: shared by the successive connections of one client, so a
    new connection after a failed one starts at the node after the last tried."""

    def __init__(self, nodes: Sequence[str]) -> None:
        self.nodes = tuple(nodes)
        self._next = 0
        self.current: str | None = None  #: the node of the last attempt

    def advance(self) -> str:
        self.current = self.nodes[self._next % len(self.nodes)]
        self._next += 1
        return self.current


class NodesConnection(RobustConnection):
    """A :class:`~aio_pika.RobustConnection` over the nodes of ``cursor``; build it with
    :func:`connect_nodes`."""

    cursor: Cursor

    async def _connect_next(self) -> None:
        node = self.cursor.advance()
        self.url = URL(node)
        log.debug("connecting to RabbitMQ at %s", where(node))
        await _connect_transport(self)
        log.info("connected to RabbitMQ at %s", where(node))


setattr(NodesConnection, _HOOK, NodesConnection._connect_next)


async def connect_nodes(
    cursor: Cursor, *, attempt_timeout: float, **kwargs: Any
) -> NodesConnection:
    """A robust connection whose first attempt goes to the cursor's next node; with
    several nodes, a failed first attempt tries the next ones (each attempt within
    ``attempt_timeout``) before it gives up with the last error."""
    last: BaseException | None = None
    for _ in cursor.nodes:
        connection = NodesConnection(URL(cursor.nodes[0]), **kwargs)
        connection.cursor = cursor
        try:
            await connection.connect(timeout=attempt_timeout)
        except asyncio.CancelledError:
            await connection.close()
            raise
        except Exception as exc:
            await connection.close()
            if len(cursor.nodes) > 1:
                log.warning("RabbitMQ at %s unreachable: %s", where(cursor.current or ""), exc)
            last = exc
            continue
        return connection
    assert last is not None
    raise last
