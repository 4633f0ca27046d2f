"""Emptying the test database's tables between tests, cheaply."""

from __future__ import annotations

import asyncpg

#: Rows a table may hold for :func:`empty` to delete them rather than truncate it.
DELETE_AT_MOST = 500


async def empty(conn: asyncpg.Connection, *tables: str) -> None:
    """``tables`` without a row, and the rows of the tables referencing them too.

    Only the tables holding a row are emptied (the look costs nothing). They are emptied
    with DELETE, whose foreign keys' ON DELETE CASCADE removes the referencing rows: on the
    few rows a test leaves it takes under a millisecond, where a TRUNCATE costs tens of ms
    a table even when it holds one row (new files, synced at commit), which every test
    paid. A table of more than :data:`DELETE_AT_MOST` rows is truncated (a DELETE goes
    row by row). The TCC events' append-only trigger lets a delete through with
    ``rmsg.tcc_purge`` on, as it does the retention purge's, for this transaction only.
    Should a DELETE be refused (a reference without a cascade, a table's own guard), the
    tables are truncated with CASCADE as before: emptied either way."""
    held = [t for t in tables if await conn.fetchval(f"SELECT EXISTS (SELECT FROM {t})")]
    if not held:
        return
    if any([await _more_than(conn, t, DELETE_AT_MOST) for t in held]):
        # thousands of rows (a load test's): a DELETE, row by row, would cost more
        await conn.execute(f"TRUNCATE {', '.join(held)} CASCADE")
        return
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL rmsg.tcc_purge = on")
            for table in held:
                await conn.execute(f"DELETE FROM {table}")
    except asyncpg.PostgresError:
        await conn.execute(f"TRUNCATE {', '.join(held)} CASCADE")


async def _more_than(conn: asyncpg.Connection, table: str, n: int) -> bool:
    over: bool = await conn.fetchval(
        f"SELECT count(*) > $1 FROM (SELECT FROM {table} LIMIT $1 + 1) AS t", n
    )
    return over
