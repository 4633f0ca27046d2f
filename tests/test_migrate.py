"""Migrations: idempotent, and safe when several instances run them at once."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from reliable_msg.service.migrate import available
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
