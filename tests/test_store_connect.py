"""Opening the store: ``serve`` waits for a PostgreSQL that is not there yet (restarting,
or started together with the service) and fails at once on a refusal that waiting will
not change. The server's absence is real: a proxy in front of it refuses connections."""

from __future__ import annotations

import asyncio

import pytest

from reliable_msg.errors import StoreError
from reliable_msg.harness.proxy import FaultProxy
from reliable_msg.service.store import PgStore
from tests.conftest import SERVER_URL


async def test_connect_waits_for_postgresql_to_come_back() -> None:
    async with FaultProxy("127.0.0.1", 5432) as proxy:
        await proxy.down()
        dsn = proxy.url("postgresql", "postgres", "/postgres")

        async def back_soon() -> None:
            await asyncio.sleep(1.5)
            await proxy.up()

        comeback = asyncio.create_task(back_soon())
        store = await PgStore.connect(dsn, pool_size=2, wait=30.0)
        try:
            await store.ping()
            assert comeback.done()  # it did wait for the server, it did not get through
        finally:
            await store.close()
            await comeback


async def test_connect_without_wait_fails_at_once() -> None:
    async with FaultProxy("127.0.0.1", 5432) as proxy:
        await proxy.down()
        with pytest.raises(StoreError, match="cannot connect to PostgreSQL"):
            await PgStore.connect(proxy.url("postgresql", "postgres", "/postgres"), wait=0.0)


async def test_a_refusal_is_not_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """A database that does not exist will not appear by waiting: no retry."""
    attempts = 0
    original = PgStore._connect

    async def counted(dsn: str, pool_size: int) -> PgStore:
        nonlocal attempts
        attempts += 1
        return await original(dsn, pool_size)

    monkeypatch.setattr(PgStore, "_connect", counted)
    with pytest.raises(StoreError, match="does not exist"):
        await PgStore.connect(f"{SERVER_URL}/rmsg_no_such_database", wait=30.0)
    assert attempts == 1
