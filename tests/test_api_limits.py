"""The rate limit per credential (``[limits]``): 429 ``rate_limited`` with ``Retry-After``
over it, nothing written, and no effect on other credentials or on the probes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client import REGISTRY

from reliable_msg.sdk.client import RetryPolicy, ServiceClient
from reliable_msg.service.api import create_app
from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from tests.conftest import ADMIN, GROUP_TOKENS, OTHER_PRODUCER, PRODUCER
from tests.test_api_errors import assert_error, message, send, snapshot

#: Requests a credential may send at once in these tests. The rate is so low that no
#: token comes back while a test runs, whatever the machine's pace.
BURST = 5
SLOW = {"rate": 0.001, "burst": BURST}


@pytest.fixture
def limits() -> dict[str, Any]:
    return SLOW


@pytest.fixture
def settings(make_settings: Callable[..., Settings], limits: dict[str, Any]) -> Settings:
    return make_settings(limits=limits)


def from_address(runtime: Runtime, host: str) -> httpx.AsyncClient:
    """A client of the runtime's app whose requests come from ``host``."""
    transport = httpx.ASGITransport(app=create_app(runtime), client=(host, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://rmsg")


@pytest.fixture
async def elsewhere(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    async with from_address(runtime, "192.0.2.7") as client:
        yield client


def refused(role: str) -> float:
    return REGISTRY.get_sample_value("rmsg_rate_limited_total", {"role": role}) or 0.0


async def test_over_the_limit_is_429_with_retry_after_and_nothing_is_written(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    for i in range(BURST):  # within the limit nothing is refused
        r = await send(client, "POST", "/v1/messages", PRODUCER, message(f"m-{i}"))
        assert r.status_code == 201, r.text
    before = await snapshot(db)
    counted = refused("producer")

    r = await send(client, "POST", "/v1/messages", PRODUCER, message("one-too-many"))
    error = assert_error(r, 429, "rate_limited")
    assert "too many requests for the producer 'order'" in error["message"]
    assert int(r.headers["Retry-After"]) >= 1
    r = await send(client, "POST", "/v1/messages/m-0/confirm", PRODUCER)
    assert_error(r, 429, "rate_limited")
    r = await send(client, "POST", "/v1/batch/prepare", PRODUCER, {"messages": [message("b")]})
    assert_error(r, 429, "rate_limited")

    assert await snapshot(db) == before
    assert refused("producer") == counted + 3


async def test_another_credential_is_not_affected(client: httpx.AsyncClient) -> None:
    for i in range(BURST + 1):
        await send(client, "POST", "/v1/messages", PRODUCER, message(f"m-{i}"))
    r = await send(client, "GET", "/v1/messages/m-0", PRODUCER)
    assert_error(r, 429, "rate_limited")

    r = await send(client, "POST", "/v1/messages", OTHER_PRODUCER, message("o-1"))
    assert r.status_code == 201, r.text
    r = await send(client, "POST", "/v1/batch/ack", GROUP_TOKENS["inventory"], {"ids": ["m-0"]})
    assert r.status_code == 200, r.text
    r = await send(client, "GET", "/v1/messages/m-0", ADMIN)
    assert r.status_code == 200, r.text


async def test_requests_without_a_valid_token_are_limited_by_address(
    client: httpx.AsyncClient, elsewhere: httpx.AsyncClient
) -> None:
    for _ in range(BURST):
        r = await send(client, "GET", "/v1/stats", "not-a-token")
        assert_error(r, 401, "unauthorized")
    r = await send(client, "GET", "/v1/stats", "not-a-token")
    error = assert_error(r, 429, "rate_limited")
    assert "from this address" in error["message"]
    assert int(r.headers["Retry-After"]) >= 1
    r = await send(client, "GET", "/v1/stats", None)
    assert_error(r, 429, "rate_limited")

    # Another address, and a valid token from the same address, are not affected.
    r = await send(elsewhere, "GET", "/v1/stats", "not-a-token")
    assert_error(r, 401, "unauthorized")
    r = await send(client, "GET", "/v1/stats", ADMIN)
    assert r.status_code == 200, r.text


async def test_the_probes_are_not_limited(client: httpx.AsyncClient) -> None:
    for _ in range(BURST + 1):
        await send(client, "GET", "/v1/stats", None)
    for _ in range(BURST + 1):
        for path in ("/healthz", "/readyz", "/metrics"):
            r = await client.get(path)
            assert r.status_code == 200, (path, r.text)


async def test_the_schema_documents_429_on_every_call_that_takes_a_token(
    client: httpx.AsyncClient,
) -> None:
    schema = (await client.get("/openapi.json")).json()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            documented = "429" in operation["responses"]
            assert documented is path.startswith("/v1/"), (method, path)
            if documented:
                headers = operation["responses"]["429"]["headers"]
                assert headers["Retry-After"]["required"] is True


@pytest.mark.parametrize("limits", [{"rate": 0.5, "burst": 1}])
async def test_the_sdk_waits_out_a_429_and_retries(service_url: str) -> None:
    counted = refused("producer")
    async with ServiceClient(service_url, PRODUCER, retry=RetryPolicy(initial=0.01)) as sdk:
        first = await sdk.prepare(message("sdk-1"))
        second = await sdk.prepare(message("sdk-2"))  # refused once, then taken
    assert (first["status"], second["status"]) == ("pending", "pending")
    assert refused("producer") >= counted + 1
