"""Retention of the TCC coordinator: finished transactions past ``tcc.retention`` go with
their branches and events, nothing else does; the events stay append-only otherwise."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import asyncpg
import pytest

from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from tests.helpers.tcc_api import empty_tcc_tables, tcc_settings


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return tcc_settings(make_settings, retention=3600.0)


async def add(db: asyncpg.Connection, gid: str, status: str, age: timedelta) -> None:
    """A transaction in ``status`` created (and finished, if final) ``age`` ago, with a
    branch and an event."""
    await db.execute(
        """
        INSERT INTO rmsg_tcc_transaction (gid, initiator, status, timeout, deadline,
                                          created_at, updated_at, finished_at)
        VALUES ($1, 'order', $2, interval '30 s', now() - $3::interval + interval '30 s',
                now() - $3::interval, now() - $3::interval,
                CASE WHEN $2 IN ('confirmed', 'cancelled') THEN now() - $3::interval END)
        """,
        gid,
        status,
        age,
    )
    branch = {"confirmed": "confirmed", "cancelled": "cancelled"}.get(status, "registered")
    await db.execute(
        "INSERT INTO rmsg_tcc_branch (gid, branch, participant, payload, status)"
        " VALUES ($1, 'b', 'inventory', '{}', $2)",
        gid,
        branch,
    )
    await db.execute(
        "INSERT INTO rmsg_tcc_event (gid, op, outcome) VALUES ($1, 'begin', 'ok')", gid
    )


async def test_purge_deletes_only_old_finished_transactions_with_their_rows(
    runtime: Runtime, db: asyncpg.Connection
) -> None:
    await empty_tcc_tables(db)
    old, new = timedelta(hours=2), timedelta(minutes=10)
    for gid, status, age in [
        ("old-confirmed", "confirmed", old),
        ("old-cancelled", "cancelled", old),
        ("new-confirmed", "confirmed", new),
        ("old-confirming", "confirming", old),
        ("old-cancelling", "cancelling", old),
        ("old-trying", "trying", old),
    ]:
        await add(db, gid, status, age)
    # more old finished ones than one batch (scanner.batch is under 1000: batches of 1000)
    for i in range(1005):
        await add(db, f"bulk-{i}", "cancelled", timedelta(days=1))

    await runtime.purger.run_once()

    left = ["new-confirmed", "old-cancelling", "old-confirming", "old-trying"]
    for table in ("rmsg_tcc_transaction", "rmsg_tcc_branch", "rmsg_tcc_event"):
        gids = await db.fetch(f"SELECT DISTINCT gid FROM {table} ORDER BY gid")
        assert [r["gid"] for r in gids] == left, table
    assert await runtime.tcc_store.purge(3600.0, batch=10) == 0


async def test_a_plain_delete_of_events_is_still_refused(
    runtime: Runtime, db: asyncpg.Connection
) -> None:
    await empty_tcc_tables(db)
    await add(db, "old-confirmed", "confirmed", timedelta(hours=2))
    await add(db, "kept", "confirming", timedelta(hours=2))
    assert await runtime.tcc_store.purge(3600.0, batch=10) == 1
    # the purge's setting was local to its own transaction, also on the pool it used
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await runtime.tcc_store.pool.execute("DELETE FROM rmsg_tcc_event")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await db.execute("DELETE FROM rmsg_tcc_event")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await db.execute("DELETE FROM rmsg_tcc_transaction WHERE gid = 'kept'")
    assert await db.fetchval("SELECT count(*) FROM rmsg_tcc_event") == 1
