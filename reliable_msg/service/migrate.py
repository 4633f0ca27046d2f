"""Versioned SQL migrations, applied in order under an advisory lock.

Files ``migrations/NNNN_name.sql`` ship with the package. Each is applied once, in its
own transaction, and recorded in ``rmsg_schema_migrations``; several instances may run
``migrate`` at once: the lock makes the others wait and then find nothing to do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from urllib.parse import unquote, urlsplit

import asyncpg

from reliable_msg.constants import MIGRATION_LOCK_NAME, MIGRATION_TABLE
from reliable_msg.errors import StoreError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available() -> list[Migration]:
    """The migrations shipped with the package, by version."""
    found = []
    for entry in resources.files("reliable_msg.service.migrations").iterdir():
        if entry.name.endswith(".sql"):
            version, _, rest = entry.name.partition("_")
            found.append(Migration(int(version), rest.removesuffix(".sql"), entry.read_text()))
    return sorted(found, key=lambda m: m.version)


async def ensure_database(dsn: str) -> None:
    """Create the database named in ``dsn`` if the server does not have it yet."""
    try:
        conn = await _connect(dsn)
    except asyncpg.InvalidCatalogNameError:
        pass
    else:
        await conn.close()
        return
    name = unquote(urlsplit(dsn).path.lstrip("/"))
    admin = await _connect(dsn, database="postgres")
    try:
        await admin.execute("CREATE DATABASE " + _quote_ident(name))
        log.info("created database %s", name)
    except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
        # Another instance created it a moment ago.
        pass
    finally:
        await admin.close()


async def migrate(dsn: str, *, create_database: bool = True) -> list[int]:
    """Apply every migration not applied yet; return the versions applied now."""
    if create_database:
        await ensure_database(dsn)
    conn = await _connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock(hashtext($1))", MIGRATION_LOCK_NAME)
        try:
            return await _apply_missing(conn)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", MIGRATION_LOCK_NAME)
    finally:
        await conn.close()


async def _connect(dsn: str, database: str | None = None) -> asyncpg.Connection:
    """Connect, turning an unreachable server into :class:`StoreError`; a missing
    database still raises ``InvalidCatalogNameError``."""
    try:
        return await asyncpg.connect(dsn, timeout=10, database=database)
    except asyncpg.InvalidCatalogNameError:
        raise
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise StoreError(f"cannot connect to PostgreSQL: {exc}") from exc


async def _apply_missing(conn: asyncpg.Connection) -> list[int]:
    await conn.execute(
        f"CREATE TABLE IF NOT EXISTS {MIGRATION_TABLE} ("
        " version integer PRIMARY KEY, name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )
    done = {r["version"] for r in await conn.fetch(f"SELECT version FROM {MIGRATION_TABLE}")}
    applied = []
    for migration in available():
        if migration.version in done:
            continue
        async with conn.transaction():
            await conn.execute(migration.sql)
            await conn.execute(
                f"INSERT INTO {MIGRATION_TABLE} (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
        log.info("applied migration %04d_%s", migration.version, migration.name)
        applied.append(migration.version)
    return applied


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
