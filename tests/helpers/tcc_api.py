"""What the TCC coordinator's API tests share: participants in the settings, empty
``rmsg_tcc_*`` tables, and a snapshot of them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg

from reliable_msg.service.settings import Settings
from tests.helpers import tables

#: The participants the tests declare: name -> (base URL, token).
PARTICIPANTS = {
    "inventory": ("http://127.0.0.1:9/tcc/inventory", "inventory-participant-token"),
    "credit": ("http://127.0.0.1:9/tcc/credit/", "credit-participant-token"),
}
MAX_BRANCHES = 4
MAX_PAYLOAD = 256
MAX_TIMEOUT = 60.0


def tcc_settings(make_settings: Callable[..., Settings], **tcc: Any) -> Settings:
    return make_settings(
        participants={
            name: {"url": url, "token": token} for name, (url, token) in PARTICIPANTS.items()
        },
        tcc={
            "max_branches": MAX_BRANCHES,
            "max_payload_bytes": MAX_PAYLOAD,
            "max_timeout": MAX_TIMEOUT,
            **tcc,
        },
    )


async def empty_tcc_tables(db: asyncpg.Connection) -> None:
    """TRUNCATE (the one way past the events' append-only trigger besides the purge)."""
    await tables.empty(db, "rmsg_tcc_transaction", "rmsg_tcc_branch", "rmsg_tcc_event")


async def snapshot(db: asyncpg.Connection) -> list[tuple[Any, ...]]:
    """Every row of the three tables, every column, in a stable order."""
    rows: list[tuple[Any, ...]] = []
    for table, order in (
        ("rmsg_tcc_transaction", "gid"),
        ("rmsg_tcc_branch", "gid, branch"),
        ("rmsg_tcc_event", "id"),
    ):
        found = await db.fetch(f"SELECT * FROM {table} ORDER BY {order}")
        rows += [(table, *r.values()) for r in found]
    return rows
