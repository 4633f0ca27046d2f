"""The cursor of a message list, as the API and the dashboard hand it out.

A page ends at ``(created_at, id)`` of its last message; the next page starts after it.
Clients get it as an opaque URL-safe string and pass it back unchanged.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

from reliable_msg.errors import BadRequest, Code
from reliable_msg.policy import ID_RE

#: Where a page of the list ended: its last message's creation time and id.
Position = tuple[datetime, str]


def encode(position: Position | None) -> str | None:
    """The cursor to hand out for ``position`` (None at the end of the list)."""
    if position is None:
        return None
    raw = json.dumps([position[0].isoformat(), position[1]]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(cursor: str | None) -> Position | None:
    """The position a cursor of :func:`encode` stands for (None for no cursor); raises
    :class:`BadRequest` (``bad_cursor``) for anything else."""
    if not cursor:
        return None
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        at, id = json.loads(base64.urlsafe_b64decode(padded))
        if not isinstance(id, str) or not ID_RE.fullmatch(id):
            raise ValueError("not a message id")
        # in UTC here, so that a date out of range fails here rather than in asyncpg
        return datetime.fromisoformat(at).astimezone(UTC), id
    # RecursionError: json.loads of deeply nested arrays (a hostile cursor), no ValueError
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise BadRequest("cursor is not one this service handed out", code=Code.BAD_CURSOR) from exc
