"""A careless or hostile client that knows only the README, against a real HTTP server.

Each case here was answered wrong once: a header number that changed on its way to
RabbitMQ and an id that no client can put in a URL path.

The module's tests share one started, served service (``shared``) and run in the
module's event loop; each test still gets tables emptied first (``db``). No test here
changes the service itself, only rows.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest
import pytest_asyncio

from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from tests.conftest import (
    ADMIN,
    AMQP_URL,
    PRODUCER,
    auth,
    emptied_db,
    served_runtime,
    settings_for,
    unique_names,
)
from tests.test_api_errors import assert_error, snapshot

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def settings(database_url: str) -> Settings:
    """The test settings, with RabbitMQ names and a Redis namespace of the module's own."""
    return settings_for(database_url, unique_names())


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared(settings: Settings) -> AsyncIterator[tuple[Runtime, str]]:
    """One started service for the module's tests, served on a real port."""
    async with served_runtime(settings) as served:
        yield served


@pytest_asyncio.fixture(loop_scope="module")
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """The test database with its tables emptied first, in the module's event loop."""
    async with emptied_db(database_url) as conn:
        yield conn


@pytest.fixture
def runtime(shared: tuple[Runtime, str], db: asyncpg.Connection) -> Runtime:
    """The shared service, on tables emptied for this test (as a fresh one's were)."""
    return shared[0]


@pytest.fixture
def service_url(shared: tuple[Runtime, str], runtime: Runtime) -> str:
    return shared[1]


@pytest_asyncio.fixture(loop_scope="module")
async def amqp() -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    connection = await aio_pika.connect(AMQP_URL)
    yield connection
    await connection.close()


def message(id: str, **fields: Any) -> dict[str, Any]:
    return {"id": id, "topic": "order.paid", "payload": {"order": 1}, **fields}


async def post(url: str, path: str, body: Any, token: str = PRODUCER) -> httpx.Response:
    content = None if body is None else json.dumps(body)
    headers = {**auth(token), "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        return await client.post(path, content=content, headers=headers)


# -- header numbers: what is stored is what goes on the wire ----------------------------


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(0.1, id="not-exact-in-32-bits"),
        pytest.param(16777217.0, id="integral-float-over-24-bits"),
        pytest.param(1e-320, id="subnormal-flushed-to-zero"),
        pytest.param(1e39, id="over-the-32-bit-range"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/messages", "/v1/batch/prepare"])
async def test_header_float_that_amqp_would_change_is_422_and_stores_nothing(
    service_url: str, db: asyncpg.Connection, value: float, path: str
) -> None:
    before = await snapshot(db)
    item = message("f-1", headers={"price": value})
    body = item if path == "/v1/messages" else {"messages": [item]}
    error = assert_error(await post(service_url, path, body), 422, "invalid_request")
    assert "price" in error["message"] and "32-bit" in error["message"], error
    assert await snapshot(db) == before


async def test_header_floats_reach_rabbitmq_as_stored(
    service_url: str,
    runtime: Runtime,
    settings: Settings,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    """AMQP field tables carry a float as 32 bits: a value exact there arrives unchanged."""
    channel = await amqp.channel()
    queue = await channel.declare_queue("", exclusive=True)
    await queue.bind(settings.exchange, "order.paid")
    headers = {"price": 19.5, "ratio": -0.25, "zero": 0.0, "big": 16777216.0}
    r = await post(service_url, "/v1/messages", message("f-2", headers=headers))
    assert r.status_code == 201, r.text
    assert r.json()["headers"] == headers
    r = await post(service_url, "/v1/messages/f-2/confirm", None)
    assert r.status_code == 200, r.text
    got = await queue.get(timeout=5)
    wire = {k: v for k, v in got.headers.items() if not k.startswith("x-rmsg-")}
    assert wire == headers


# -- ids that are URL dot segments -------------------------------------------------------


@pytest.mark.parametrize("id", [".", ".."])
async def test_dot_segment_id_is_422_and_stores_nothing(
    service_url: str, db: asyncpg.Connection, id: str
) -> None:
    """``/v1/messages/../confirm`` is ``/v1/confirm`` to every client and proxy that
    normalises paths (RFC 3986 5.2.4), and ``/v1/messages/.`` the list: such an id
    could be prepared but never confirmed, cancelled or acked by its path."""
    before = await snapshot(db)
    for path, body in [
        ("/v1/messages", message(id)),
        ("/v1/batch/prepare", {"messages": [message(id)]}),
    ]:
        assert_error(await post(service_url, path, body), 422, "invalid_request")
    assert_error(await post(service_url, "/v1/batch/confirm", {"ids": [id]}), 422)
    assert await snapshot(db) == before


async def test_ids_with_dots_that_are_not_dot_segments_are_accepted(
    service_url: str, db: asyncpg.Connection
) -> None:
    for id in ["...", ".a", "a..b", "a."]:
        r = await post(service_url, "/v1/messages", message(id))
        assert r.status_code == 201, r.text
        async with httpx.AsyncClient(base_url=service_url, timeout=10) as client:
            r = await client.post(f"/v1/messages/{id}/confirm", headers=auth(PRODUCER))
        assert r.status_code == 200, (id, r.text)


# -- authorization -----------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer"])
async def test_bearer_scheme_is_case_insensitive(
    service_url: str, db: asyncpg.Connection, scheme: str
) -> None:
    """RFC 9110 11.1: the auth scheme is case-insensitive."""
    async with httpx.AsyncClient(base_url=service_url, timeout=10) as client:
        r = await client.post(
            "/v1/messages",
            content=json.dumps(message(f"s-{scheme}")),
            headers={"Authorization": f"{scheme} {PRODUCER}", "Content-Type": "application/json"},
        )
    assert r.status_code == 201, r.text


@pytest.mark.parametrize(
    "tokens",
    [
        pytest.param((PRODUCER, "wrong"), id="good-then-bad"),
        pytest.param(("wrong", PRODUCER), id="bad-then-good"),
        pytest.param((ADMIN, PRODUCER), id="admin-then-producer"),
        pytest.param((PRODUCER, PRODUCER), id="same-twice"),
    ],
)
async def test_two_authorization_headers_are_401_whatever_their_order(
    service_url: str, db: asyncpg.Connection, tokens: tuple[str, str]
) -> None:
    """Which identity a request acts as must not depend on header order (a proxy that
    adds its own Authorization, say): two headers are refused, and nothing is written."""
    before = await snapshot(db)
    headers = [("Authorization", f"Bearer {t}") for t in tokens]
    headers.append(("Content-Type", "application/json"))
    async with httpx.AsyncClient(base_url=service_url, timeout=10) as client:
        r = await client.post("/v1/messages", content=json.dumps(message("two")), headers=headers)
    assert_error(r, 401, "unauthorized")
    assert "one Authorization header" in r.json()["error"]["message"]
    assert await snapshot(db) == before
