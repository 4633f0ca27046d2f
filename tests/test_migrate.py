"""Migrations: idempotent, and safe when several instances run them at once."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from reliable_msg.constants import TCC_PURGE_SETTING
from reliable_msg.service.migrate import available, migrate
from reliable_msg.service.tcc.states import BranchStatus, TxStatus, check_values
from tests.conftest import SERVER_URL as SERVER


@pytest.fixture
async def fresh_database() -> AsyncIterator[str]:
    """The URL of a database that does not exist yet; dropped afterwards."""
    name = f"rmsg_migrate_{uuid.uuid4().hex[:8]}"
    yield f"{SERVER}/{name}"
    admin = await asyncpg.connect(f"{SERVER}/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def run_migrate(url: str) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "reliable_msg",
        "migrate",
        env={"RMSG_DATABASE_URL": url, "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return subprocess.CompletedProcess([], proc.returncode, out.decode(), err.decode())


async def test_four_concurrent_migrates_create_and_migrate_once(fresh_database: str) -> None:
    results = await asyncio.gather(*(run_migrate(fresh_database) for _ in range(4)))
    assert [r.returncode for r in results] == [0] * 4, [r.stderr for r in results]
    outputs = sorted(r.stdout.strip() for r in results)
    assert outputs == [f"applied {len(available())} migration(s)"] + ["schema up to date"] * 3

    conn = await asyncpg.connect(fresh_database)
    try:
        versions = await conn.fetch("SELECT version FROM rmsg_schema_migrations")
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE tablename LIKE 'rmsg_%' ORDER BY 1"
        )
    finally:
        await conn.close()
    assert [r["version"] for r in versions] == [m.version for m in available()]
    assert [r["tablename"] for r in tables] == [
        "rmsg_delivery",
        "rmsg_message",
        "rmsg_schema_migrations",
        "rmsg_tcc_branch",
        "rmsg_tcc_event",
        "rmsg_tcc_transaction",
        "rmsg_tcc_used_gid",
        "rmsg_transition",
        "rmsg_used_id",
    ]

    again = await run_migrate(fresh_database)
    assert (again.returncode, again.stdout.strip()) == (0, "schema up to date")


async def test_migrate_against_a_server_that_does_not_answer() -> None:
    result = await run_migrate("postgresql://postgres@127.0.0.1:1/nothing")
    assert result.returncode == 1
    assert result.stderr.startswith("reliable-msg: cannot connect to PostgreSQL")
    assert "Traceback" not in result.stderr


async def test_upgrading_claims_the_ids_of_the_messages_already_stored(
    fresh_database: str,
) -> None:
    """A database at version 2 with a message: after the upgrade its id is a used id, so
    it stays refused to a new message once the purge deletes the message."""
    admin = await asyncpg.connect(f"{SERVER}/postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{fresh_database.rsplit("/", 1)[1]}"')
    finally:
        await admin.close()
    conn = await asyncpg.connect(fresh_database)
    try:
        await conn.execute(
            "CREATE TABLE rmsg_schema_migrations (version integer PRIMARY KEY,"
            " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for m in available()[:2]:
            await conn.execute(m.sql)
            await conn.execute(
                "INSERT INTO rmsg_schema_migrations (version, name) VALUES ($1, $2)",
                m.version,
                m.name,
            )
        await conn.execute(
            "INSERT INTO rmsg_message (id, topic, producer, payload, status, groups)"
            " VALUES ('old-1', 'order.paid', 'order', '{}', 'done', '{inventory}')"
        )
        result = await run_migrate(fresh_database)
        assert result.returncode == 0, result.stderr
        used = await conn.fetch("SELECT id, producer FROM rmsg_used_id")
    finally:
        await conn.close()
    assert [tuple(r) for r in used] == [("old-1", "order")]


async def test_the_tcc_tables_apply_once_and_check_what_they_hold(fresh_database: str) -> None:
    """0005 on a database at version 4: applied, then a no-op; the CHECKs allow exactly the
    statuses of the state machine; the event log is append-only but for the purge."""
    await migrate(fresh_database)  # creates the database, all versions
    conn = await asyncpg.connect(fresh_database)
    try:
        await conn.execute("DROP TABLE rmsg_tcc_event, rmsg_tcc_branch, rmsg_tcc_transaction")
        await conn.execute("DROP FUNCTION rmsg_tcc_event_append_only")
        await conn.execute("DELETE FROM rmsg_schema_migrations WHERE version = 5")
        assert await migrate(fresh_database) == [5]
        assert await migrate(fresh_database) == []
        sql = next(m.sql for m in available() if m.version == 5)
        assert check_values(TxStatus) in sql and check_values(BranchStatus) in sql

        async def begin(gid: str, status: str = "trying") -> None:
            await conn.execute(
                "INSERT INTO rmsg_tcc_transaction (gid, initiator, status, timeout, deadline,"
                " finished_at) VALUES ($1, 'order', $2, interval '30 s', now() + interval"
                " '30 s', CASE WHEN $2 IN ('confirmed', 'cancelled') THEN now() END)",
                gid,
                status,
            )

        for status in TxStatus:
            await begin(f"g-{status}", status)
        with pytest.raises(asyncpg.CheckViolationError, match="rmsg_tcc_transaction_status"):
            await begin("g-bad", "committed")
        with pytest.raises(asyncpg.CheckViolationError, match="rmsg_tcc_transaction_status"):
            await conn.execute("UPDATE rmsg_tcc_transaction SET status = 'done'")
        with pytest.raises(asyncpg.CheckViolationError, match="rmsg_tcc_transaction_finished"):
            await conn.execute(
                "UPDATE rmsg_tcc_transaction SET status = 'confirmed' WHERE gid = 'g-trying'"
            )

        async def register(branch: str, status: str) -> None:
            await conn.execute(
                "INSERT INTO rmsg_tcc_branch (gid, branch, participant, payload, status)"
                " VALUES ('g-trying', $1, 'inventory', '{\"sku\": 1}', $2)",
                branch,
                status,
            )

        for branch_status in BranchStatus:
            await register(f"b-{branch_status}", branch_status)
        with pytest.raises(asyncpg.CheckViolationError, match="rmsg_tcc_branch_status"):
            await register("b-bad", "tried")
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await conn.execute(
                "INSERT INTO rmsg_tcc_branch (gid, branch, participant, payload, status)"
                " VALUES ('nope', 'b', 'inventory', '{}', 'registered')"
            )

        await conn.execute(
            "INSERT INTO rmsg_tcc_event (gid, branch, op, outcome, http_status)"
            " VALUES ('g-confirmed', 'b1', 'confirm', 'ok', 200)"
        )
        for statement in (
            "UPDATE rmsg_tcc_event SET outcome = 'failed'",
            "DELETE FROM rmsg_tcc_event",
            "DELETE FROM rmsg_tcc_transaction WHERE gid = 'g-confirmed'",  # by cascade
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await conn.execute(statement)
        assert await conn.fetchval("SELECT count(*) FROM rmsg_tcc_event") == 1
        async with conn.transaction():  # as the retention purge does
            await conn.execute(f"SET LOCAL {TCC_PURGE_SETTING} = 'on'")
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="UPDATE refused"):
                async with conn.transaction():
                    await conn.execute("UPDATE rmsg_tcc_event SET outcome = 'failed'")
            await conn.execute("DELETE FROM rmsg_tcc_transaction WHERE gid = 'g-confirmed'")
        assert await conn.fetchval("SELECT count(*) FROM rmsg_tcc_event") == 0
        with pytest.raises(asyncpg.InsufficientPrivilegeError):  # the setting was LOCAL
            await conn.execute(
                "INSERT INTO rmsg_tcc_event (gid, op, outcome) VALUES ('g-trying', 'begin', 'ok');"
                "DELETE FROM rmsg_tcc_event"
            )
    finally:
        await conn.close()
