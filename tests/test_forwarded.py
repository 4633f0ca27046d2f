"""``X-Forwarded-For`` is trusted only from the addresses in ``FORWARDED_ALLOW_IPS``,
through a real ``reliable-msg serve`` (uvicorn): from the trusted proxy the header's
address is the client's, from any other peer the header is ignored. Seen through what is
keyed by the client address: the API's limit of requests without a valid token, and the
dashboard's limit of failed logins."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import httpx
import pytest

from reliable_msg.service.settings import Settings
from tests.helpers.service import Instance, remove_traces, running_async, write_config

PROXY = "127.0.0.2"  #: the one peer FORWARDED_ALLOW_IPS trusts
DIRECT = "127.0.0.1"  #: any other peer
BURST = 2


@pytest.fixture
async def instance(
    make_settings: Callable[..., Settings], db: asyncpg.Connection, tmp_path: Path
) -> AsyncIterator[Instance]:
    settings = make_settings(
        limits={"rate": 0.01, "burst": BURST},
        dashboard={"login_failures": BURST, "login_interval": 100.0},
    )
    config = write_config(settings, tmp_path / "config.toml")
    try:
        async with running_async(config, tmp_path, env={"FORWARDED_ALLOW_IPS": PROXY}) as instance:
            yield instance
    finally:
        await remove_traces(settings)


def client(instance: Instance, peer: str) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(local_address=peer)
    return httpx.AsyncClient(base_url=instance.url, transport=transport)


async def anonymous(http: httpx.AsyncClient, forwarded: str) -> int:
    r = await http.get(
        "/v1/messages/x",
        headers={"Authorization": "Bearer wrong", "X-Forwarded-For": forwarded},
    )
    return r.status_code


async def login(http: httpx.AsyncClient, forwarded: str) -> int:
    r = await http.post(
        "/dashboard/login", data={"token": "guess"}, headers={"X-Forwarded-For": forwarded}
    )
    return r.status_code


#: One request keyed by the client address: 401 within the address's budget, then 429.
Attempt = Callable[[httpx.AsyncClient, str], Awaitable[int]]


@pytest.mark.parametrize("attempt", [anonymous, login], ids=["api", "dashboard-login"])
async def test_forwarded_for_is_trusted_from_the_allowed_proxy_only(
    instance: Instance, attempt: Attempt
) -> None:
    async with client(instance, PROXY) as proxy, client(instance, DIRECT) as direct:
        # Through the proxy: each forwarded address has a budget of its own.
        assert [await attempt(proxy, "198.51.100.1") for _ in range(BURST)] == [401] * BURST
        assert await attempt(proxy, "198.51.100.1") == 429
        assert await attempt(proxy, "198.51.100.2") == 401
        # Straight from another peer: the header names nobody; the peer is the client.
        assert await attempt(direct, "198.51.100.1") == 401
        assert await attempt(direct, "198.51.100.3") == 401
        assert await attempt(direct, "198.51.100.4") == 429
