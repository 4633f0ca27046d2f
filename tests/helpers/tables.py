"""Emptying the test database's tables between tests, cheaply."""

from __future__ import annotations

import asyncpg


async def empty(conn: asyncpg.Connection, *tables: str) -> None:
    """``tables`` without a row, and the tables referencing them too (TRUNCATE ...
    CASCADE; it passes the TCC events' append-only trigger, which guards rows, not
    tables). Only the tables holding a row are truncated: a TRUNCATE costs tens of ms a
    table even when it is empty (new files, synced at commit), the look costs nothing,
    and a table whose rows another references is not empty when they are there."""
    held = [t for t in tables if await conn.fetchval(f"SELECT EXISTS (SELECT FROM {t})")]
    if held:
        await conn.execute(f"TRUNCATE {', '.join(held)} CASCADE")
