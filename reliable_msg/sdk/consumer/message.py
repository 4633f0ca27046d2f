"""What a handler sees of a message, and what no handler can take."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from reliable_msg.errors import ReliableMsgError


@dataclass(frozen=True, slots=True)
class Received:
    """A message as a handler sees it."""

    id: str
    topic: str
    payload: Any
    headers: dict[str, Any] = field(default_factory=dict)
    key: str | None = None
    attempt: int = 1
    producer: str | None = None


#: A message handler: the asyncpg connection of the transaction, and the message.
Handler = Callable[[asyncpg.Connection, Received], Awaitable[None]]


class Poison(ReliableMsgError, ValueError):
    """A delivery that no handler can ever take (no id, not JSON, no handler for its
    topic), whichever source brought it. Also a ``ValueError``, as it was before it
    joined the tree."""

    def __init__(self, reason: str, *, id: str = "") -> None:
        super().__init__(reason)
        self.id = id  #: the message id the delivery carries ("" when it has none)
