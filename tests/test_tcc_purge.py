"""Retention of the TCC coordinator: finished transactions past ``tcc.retention`` go with
their branches and events, nothing else does; the events stay append-only otherwise."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta

import asyncpg
import httpx
import pytest

from reliable_msg.constants import TCC_PURGE_SETTING
from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from tests.conftest import OTHER_PRODUCER, PRODUCER, auth
from tests.helpers import tables
from tests.helpers.tcc_api import empty_tcc_tables, snapshot, tcc_settings
from tests.test_api_errors import assert_error

BEGIN = {"gid": "racing", "timeout": 30}


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


async def _used_gids(db: asyncpg.Connection) -> list[tuple[str, str]]:
    rows = await db.fetch("SELECT gid, initiator FROM rmsg_tcc_used_gid ORDER BY gid")
    return [(r["gid"], r["initiator"]) for r in rows]


async def test_a_purged_gid_is_refused_to_every_producer_and_nothing_is_written(
    runtime: Runtime, client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    """The participants' barriers still hold the purged gid's rows: a new transaction with
    it would have its Try and Confirm answered as repeats and end confirmed, doing
    nothing. So the purge remembers the gid (in its own database transaction) and a
    begin with it is refused, 409 ``id_reused``."""
    await empty_tcc_tables(db)
    await tables.empty(db, "rmsg_tcc_used_gid")
    await add(db, "old-confirmed", "confirmed", timedelta(hours=2))
    await add(db, "new-confirmed", "confirmed", timedelta(minutes=10))
    await runtime.purger.run_once()
    assert await _used_gids(db) == [("old-confirmed", "order")]

    before = await snapshot(db), await _used_gids(db)
    for token in (PRODUCER, OTHER_PRODUCER):
        r = await client.post(
            "/v1/tcc/transactions", json={**BEGIN, "gid": "old-confirmed"}, headers=auth(token)
        )
        assert_error(r, 409, "id_reused")
    assert (await snapshot(db), await _used_gids(db)) == before
    # a gid still stored is not "used": its begin is answered as before (a repeat)
    r = await client.post(
        "/v1/tcc/transactions", json={**BEGIN, "gid": "new-confirmed"}, headers=auth(PRODUCER)
    )
    assert r.status_code == 200 and r.json()["status"] == "confirmed", r.text


async def test_a_begin_racing_the_purge_never_takes_the_gid(
    runtime: Runtime, client: httpx.AsyncClient, db: asyncpg.Connection, database_url: str
) -> None:
    """The purge's delete is open (uncommitted) while the gid is begun again: the begin
    waits for it, then must not take the gid."""
    await empty_tcc_tables(db)
    await tables.empty(db, "rmsg_tcc_used_gid")
    await add(db, "racing", "confirmed", timedelta(hours=2))
    purge = await asyncpg.connect(database_url)
    try:
        tx = purge.transaction()
        await tx.start()
        # as the purge does, in one database transaction
        await purge.execute(f"SET LOCAL {TCC_PURGE_SETTING} = 'on'")
        await purge.execute("DELETE FROM rmsg_tcc_transaction WHERE gid = 'racing'")
        await purge.execute(
            "INSERT INTO rmsg_tcc_used_gid (gid, initiator) VALUES ('racing', 'order')"
        )
        racing = asyncio.create_task(
            client.post("/v1/tcc/transactions", json=BEGIN, headers=auth(PRODUCER))
        )
        await asyncio.sleep(0.5)
        await tx.commit()
        r = await asyncio.wait_for(racing, 10)
    finally:
        await purge.close()
    assert_error(r, 409, "id_reused")
    assert await snapshot(db) == []


async def test_used_gids_are_forgotten_after_id_retention_when_it_is_set(
    runtime: Runtime,
    client: httpx.AsyncClient,
    make_settings: Callable[..., Settings],
    db: asyncpg.Connection,
) -> None:
    """``scanner.id_retention`` bounds ``rmsg_tcc_used_gid`` as it does the message ids
    (counted from the purge); unset (the ``runtime``'s), a purged gid stays refused."""
    await empty_tcc_tables(db)
    await tables.empty(db, "rmsg_tcc_used_gid")
    for gid in ("old-1", "old-2"):
        await add(db, gid, "cancelled", timedelta(hours=2))
    await runtime.purger.run_once()
    await db.execute(
        "UPDATE rmsg_tcc_used_gid SET purged_at = now() - interval '2 hours' WHERE gid = 'old-1'"
    )
    await runtime.purger.run_once()
    assert [g for g, _ in await _used_gids(db)] == ["old-1", "old-2"]

    freeing = make_settings(
        scanner={"retention": 3600.0, "id_retention": 3600.0}, tcc={"retention": 3600.0}
    )
    rt = await Runtime.create(freeing, scanners=False)
    await rt.start()
    try:
        await rt.purger.run_once()
    finally:
        await rt.stop()
    assert [g for g, _ in await _used_gids(db)] == ["old-2"]
    r = await client.post(
        "/v1/tcc/transactions", json={**BEGIN, "gid": "old-1"}, headers=auth(PRODUCER)
    )
    assert r.status_code == 201, r.text
