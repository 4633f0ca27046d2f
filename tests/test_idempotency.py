"""Prepare is idempotent for the very same request only: a repeat answers 200 (batch:
``created`` false), anything else with that id is 409 ``id_conflict``. "The same" is
canonical JSON, type-exact (1, true and 1.0 differ; key order does not), for the payload
and the headers. Over a real HTTP server and PostgreSQL.

The module's tests share one started, served service (``shared``) and run in the
module's event loop; each test still gets tables emptied first (``db``)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio

from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from tests.conftest import PRODUCER, auth, emptied_db, served_runtime, settings_for, unique_names

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
async def http(service_url: str, db: asyncpg.Connection) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=service_url, headers=auth(PRODUCER)) as c:
        yield c


async def post(http: httpx.AsyncClient, path: str, raw: str) -> httpx.Response:
    """Send ``raw`` JSON text as it is, so that key order and number spelling survive."""
    return await http.post(path, content=raw, headers={"Content-Type": "application/json"})


def body(id: str, payload: str, headers: str = "{}") -> str:
    return f'{{"id": "{id}", "topic": "order.paid", "payload": {payload}, "headers": {headers}}}'


DIFFERENT = [
    ('{"paid": 1}', '{"paid": true}'),
    ('{"paid": true}', '{"paid": 1}'),
    ('{"paid": 1}', '{"paid": 1.0}'),
    ('{"paid": 0}', '{"paid": false}'),
    ("[1, 2]", "[2, 1]"),
    ('{"a": {"b": 1}}', '{"a": {"b": true}}'),
    ('"1"', "1"),
    ('{"a": null}', "{}"),
]
SAME = [
    ('{"a": 1, "b": 2}', '{"b": 2, "a": 1}'),
    ('{"x": 1e20, "y": 0.5}', '{"y": 0.5, "x": 1e20}'),
    ('{"a": {"c": 1.5, "d": [true]}}', '{"a": {"d": [true], "c": 1.5}}'),
]


@pytest.mark.parametrize(("first", "second"), DIFFERENT)
async def test_a_payload_that_differs_in_type_is_an_id_conflict(
    http: httpx.AsyncClient, db: asyncpg.Connection, first: str, second: str
) -> None:
    assert (await post(http, "/v1/messages", body("i-1", first))).status_code == 201
    stored = await db.fetchval("SELECT payload::text FROM rmsg_message")
    r = await post(http, "/v1/messages", body("i-1", second))
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "id_conflict"
    assert await db.fetchval("SELECT payload::text FROM rmsg_message") == stored


@pytest.mark.parametrize(("first", "second"), SAME)
async def test_the_same_payload_in_another_key_order_is_a_repeat(
    http: httpx.AsyncClient, first: str, second: str
) -> None:
    assert (await post(http, "/v1/messages", body("i-1", first))).status_code == 201
    for again in (first, second):
        r = await post(http, "/v1/messages", body("i-1", again))
        assert r.status_code == 200, r.text


async def test_headers_are_compared_type_exact_and_in_any_order(http: httpx.AsyncClient) -> None:
    first = body("i-1", "{}", '{"vip": 1, "tier": "gold"}')
    assert (await post(http, "/v1/messages", first)).status_code == 201
    again = body("i-1", "{}", '{"tier": "gold", "vip": 1}')
    assert (await post(http, "/v1/messages", again)).status_code == 200
    for other in ('{"vip": true, "tier": "gold"}', '{"vip": 1.0, "tier": "gold"}', '{"vip": 1}'):
        r = await post(http, "/v1/messages", body("i-1", "{}", other))
        assert r.status_code == 409, (other, r.text)
        assert r.json()["error"]["code"] == "id_conflict"


async def test_batch_prepare_says_which_items_it_created_and_compares_type_exact(
    http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    first = [body("b-1", '{"paid": 1}'), body("b-2", '{"a": 1, "b": [1.5]}')]
    r = await post(http, "/v1/batch/prepare", f'{{"messages": [{", ".join(first)}]}}')
    assert [_outcome(i) for i in r.json()["results"]] == [
        ("b-1", True, True, None),
        ("b-2", True, True, None),
    ]
    retry = [
        body("b-1", '{"paid": true}'),
        body("b-2", '{"b": [1.5], "a": 1}'),
        body("b-3", '{"paid": 1}'),
    ]
    r = await post(http, "/v1/batch/prepare", f'{{"messages": [{", ".join(retry)}]}}')
    assert r.status_code == 200, r.text
    assert [_outcome(i) for i in r.json()["results"]] == [
        ("b-1", False, None, "id_conflict"),
        ("b-2", True, False, None),
        ("b-3", True, True, None),
    ]
    rows = await db.fetch("SELECT id, payload::text FROM rmsg_message ORDER BY id")
    assert {r["id"]: json.loads(r["payload"]) for r in rows} == {
        "b-1": {"paid": 1},
        "b-2": {"a": 1, "b": [1.5]},
        "b-3": {"paid": 1},
    }
    assert type(json.loads(rows[0]["payload"])["paid"]) is int


def _outcome(item: dict[str, Any]) -> tuple[str, bool, bool | None, str | None]:
    error = item["error"]
    return item["id"], item["ok"], item["created"], error["code"] if error else None
