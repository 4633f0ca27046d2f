"""Every route answers bad input with the right 4xx and ``{"error": {"code", "message"}}``.

Bodies are sent as raw JSON text (not httpx's ``json=``) so that a case can carry what
Python's encoder allows and a strict one refuses: NaN, lone surrogates, huge integers.
After a refused request the tables must be exactly as before: :func:`snapshot`.

The module's tests share one started service (``runtime``, ``client``: starting one per
test was most of this module's time) and run in the module's event loop; each test still
gets tables emptied first (``db``). No test here changes the service itself (its settings,
its connections, RabbitMQ or Redis): each changes only rows, and those are emptied.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio

from reliable_msg.service.api import create_app
from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from tests.conftest import (
    ADMIN,
    GROUP_TOKENS,
    OTHER_PRODUCER,
    PRODUCER,
    auth,
    emptied_db,
    settings_for,
    started_runtime,
    unique_names,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

INVENTORY = GROUP_TOKENS["inventory"]
CREDIT = GROUP_TOKENS["credit"]
PAID = {"order_id": 42, "amount": "19.90"}
MAX_PAYLOAD = 1024  # max_payload_bytes of the test settings
MAX_REQUEST = 64 * 1024  # max_request_bytes of the test settings
MAX_BATCH = 100  # max_batch of the test settings
LONG_ID = "a" * 129


def message(id: str | None = None, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"topic": "order.paid", "payload": PAID, **fields}
    if id is not None:
        body["id"] = id
    return body


async def send(
    client: httpx.AsyncClient,
    method: str,
    path: str,
    token: str | None,
    body: Any = None,
    *,
    raw: bytes | None = None,
) -> httpx.Response:
    headers = auth(token) if token is not None else {}
    if raw is None and body is not None:
        raw = json.dumps(body).encode()
    if raw is not None:
        headers["Content-Type"] = "application/json"
    return await client.request(method, path, content=raw, headers=headers)


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, str]:
    """The response is ``status`` with exactly the error shape, and ``code`` if given."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert list(body) == ["error"], body
    error: dict[str, str] = body["error"]
    assert sorted(error) == ["code", "message"], error
    assert isinstance(error["code"], str) and error["code"], error
    assert isinstance(error["message"], str) and error["message"], error
    if code is not None:
        assert error["code"] == code, error
    return error


async def snapshot(db: asyncpg.Connection) -> list[tuple[Any, ...]]:
    """Every row of both tables, to show a refused request changed nothing."""
    messages = await db.fetch(
        "SELECT id, producer, status, payload::text, headers::text, key, check_attempts,"
        " updated_at, sent_at FROM rmsg_message ORDER BY id"
    )
    deliveries = await db.fetch(
        "SELECT message_id, group_name, status, attempts, updated_at, done_at"
        " FROM rmsg_delivery ORDER BY message_id, group_name"
    )
    return [tuple(r) for r in messages] + [("delivery", *r) for r in deliveries]


async def stored(db: asyncpg.Connection) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM rmsg_message")
    return count


async def prepare(
    client: httpx.AsyncClient, id: str, *, topic: str = "order.paid", token: str = PRODUCER
) -> None:
    r = await send(client, "POST", "/v1/messages", token, message(id, topic=topic))
    assert r.status_code == 201, r.text


async def confirm(client: httpx.AsyncClient, id: str, token: str = PRODUCER) -> None:
    r = await send(client, "POST", f"/v1/messages/{id}/confirm", token)
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def settings(database_url: str) -> Settings:
    """The test settings, with RabbitMQ names and a Redis namespace of the module's own."""
    return settings_for(database_url, unique_names())


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    """One started service for the module's tests."""
    async with started_runtime(settings) as rt:
        yield rt


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://rmsg") as c:
        yield c


@pytest_asyncio.fixture(loop_scope="module")
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """The test database with its tables emptied first, in the module's event loop."""
    async with emptied_db(database_url) as conn:
        yield conn


@pytest.fixture
def client(served: httpx.AsyncClient, db: asyncpg.Connection) -> httpx.AsyncClient:
    """The shared service's client, on tables emptied for this test (as a fresh service's
    was: no row of another test is there)."""
    return served


@pytest_asyncio.fixture(loop_scope="module")
async def seeded(client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    """``p-1`` pending, ``s-1`` sent, ``d-1`` dead (check-back exhausted) of PRODUCER;
    ``o-1`` pending of OTHER_PRODUCER."""
    for id in ("p-1", "s-1", "d-1"):
        await prepare(client, id)
    await confirm(client, "s-1")
    await db.execute("UPDATE rmsg_message SET status = 'dead' WHERE id = 'd-1'")
    await prepare(client, "o-1", token=OTHER_PRODUCER)


def cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


# -- authentication: 401 -----------------------------------------------------------------

#: One call per route, each of which would change or read a seeded row if let through.
ROUTES = [
    pytest.param("POST", "/v1/messages", message("new-1"), id="prepare"),
    pytest.param("POST", "/v1/messages/p-1/confirm", None, id="confirm"),
    pytest.param("POST", "/v1/messages/p-1/cancel", None, id="cancel"),
    pytest.param("POST", "/v1/messages/s-1/ack", None, id="ack"),
    pytest.param("POST", "/v1/messages/d-1/requeue", None, id="requeue"),
    pytest.param("POST", "/v1/batch/prepare", {"messages": [message("new-1")]}, id="batch-prepare"),
    pytest.param("POST", "/v1/batch/confirm", {"ids": ["p-1"]}, id="batch-confirm"),
    pytest.param("POST", "/v1/batch/cancel", {"ids": ["p-1"]}, id="batch-cancel"),
    pytest.param("POST", "/v1/batch/ack", {"ids": ["s-1"]}, id="batch-ack"),
    pytest.param("GET", "/v1/messages/p-1", None, id="get"),
    pytest.param("GET", "/v1/messages", None, id="list"),
    pytest.param("POST", "/v1/requeue", None, id="requeue-all"),
    pytest.param("GET", "/v1/stats", None, id="stats"),
]


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(None, id="no-header"),
        pytest.param("", id="empty"),
        pytest.param("Token order-token", id="other-scheme"),
        pytest.param("order-token", id="no-scheme"),
        pytest.param("Bearer ", id="bearer-no-token"),
        pytest.param("Bearer", id="bearer-alone"),
        pytest.param("Bearer nope", id="unknown-token"),
        pytest.param(f"Bearer {PRODUCER}x", id="token-prefix-of-unknown"),
        pytest.param(f"Bearer {PRODUCER[:-1]}", id="token-truncated"),
    ],
)
@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
async def test_bad_authorization_is_401(
    client: httpx.AsyncClient,
    db: asyncpg.Connection,
    seeded: None,
    method: str,
    path: str,
    body: Any,
    authorization: str | None,
) -> None:
    before = await snapshot(db)
    headers = {} if authorization is None else {"Authorization": authorization}
    content = None if body is None else json.dumps(body).encode()
    r = await client.request(method, path, content=content, headers=headers)
    assert_error(r, 401, "unauthorized")
    assert await snapshot(db) == before


# -- authorisation: 403 ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "token"),
    [
        pytest.param("POST", "/v1/messages", message("new-1"), INVENTORY, id="prepare-by-group"),
        pytest.param("POST", "/v1/messages", message("new-1"), ADMIN, id="prepare-by-admin"),
        pytest.param(
            "POST",
            "/v1/batch/prepare",
            {"messages": [message("new-1")]},
            CREDIT,
            id="batch-prepare-by-group",
        ),
        pytest.param("POST", "/v1/messages/p-1/confirm", None, INVENTORY, id="confirm-by-group"),
        pytest.param("POST", "/v1/messages/p-1/confirm", None, ADMIN, id="confirm-by-admin"),
        pytest.param("POST", "/v1/messages/p-1/cancel", None, INVENTORY, id="cancel-by-group"),
        pytest.param("POST", "/v1/messages/p-1/cancel", None, ADMIN, id="cancel-by-admin"),
        pytest.param(
            "POST", "/v1/batch/confirm", {"ids": ["p-1"]}, INVENTORY, id="batch-confirm-by-group"
        ),
        pytest.param(
            "POST", "/v1/batch/cancel", {"ids": ["p-1"]}, ADMIN, id="batch-cancel-by-admin"
        ),
        pytest.param("POST", "/v1/messages/s-1/ack", None, PRODUCER, id="ack-by-producer"),
        pytest.param("POST", "/v1/messages/s-1/ack", None, ADMIN, id="ack-by-admin"),
        pytest.param(
            "POST", "/v1/batch/ack", {"ids": ["s-1"]}, PRODUCER, id="batch-ack-by-producer"
        ),
        pytest.param("GET", "/v1/messages/p-1", None, INVENTORY, id="get-by-group"),
        pytest.param("GET", "/v1/messages", None, PRODUCER, id="list-by-producer"),
        pytest.param("GET", "/v1/messages", None, INVENTORY, id="list-by-group"),
        pytest.param("GET", "/v1/stats", None, PRODUCER, id="stats-by-producer"),
        pytest.param("GET", "/v1/stats", None, CREDIT, id="stats-by-group"),
        pytest.param("POST", "/v1/messages/d-1/requeue", None, PRODUCER, id="requeue-by-producer"),
        pytest.param("POST", "/v1/messages/d-1/requeue", None, CREDIT, id="requeue-by-group"),
        pytest.param("POST", "/v1/requeue", None, PRODUCER, id="requeue-all-by-producer"),
        pytest.param("POST", "/v1/requeue", None, INVENTORY, id="requeue-all-by-group"),
    ],
)
async def test_wrong_role_is_403(
    client: httpx.AsyncClient,
    db: asyncpg.Connection,
    seeded: None,
    method: str,
    path: str,
    body: Any,
    token: str,
) -> None:
    before = await snapshot(db)
    r = await send(client, method, path, token, body)
    assert_error(r, 403, "forbidden")
    assert await snapshot(db) == before


@pytest.mark.parametrize(
    ("method", "path"),
    [
        pytest.param("POST", "/v1/messages/p-1/confirm", id="confirm"),
        pytest.param("POST", "/v1/messages/p-1/cancel", id="cancel"),
        pytest.param("GET", "/v1/messages/p-1", id="get"),
        pytest.param("GET", "/v1/messages/s-1", id="get-sent"),
    ],
)
async def test_another_producers_message_is_403_and_unchanged(
    client: httpx.AsyncClient, db: asyncpg.Connection, seeded: None, method: str, path: str
) -> None:
    before = await snapshot(db)
    r = await send(client, method, path, OTHER_PRODUCER)
    assert_error(r, 403, "forbidden")
    assert await snapshot(db) == before


async def test_preparing_another_producers_id_is_409_and_unchanged(
    client: httpx.AsyncClient, db: asyncpg.Connection, seeded: None
) -> None:
    before = await snapshot(db)
    r = await send(client, "POST", "/v1/messages", OTHER_PRODUCER, message("p-1"))
    assert_error(r, 409, "id_conflict")
    assert await snapshot(db) == before


# -- request bodies: 422 / 400 -----------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"payload": PAID}, id="no-topic"),
        pytest.param({"topic": "order.paid"}, id="no-payload"),
        pytest.param({}, id="empty-object"),
        pytest.param([message()], id="array-not-object"),
        pytest.param("order.paid", id="string-not-object"),
        pytest.param(None, id="null-not-object"),
        pytest.param(message(topic=5), id="topic-number"),
        pytest.param(message(topic=None), id="topic-null"),
        pytest.param(message(topic=""), id="topic-empty"),
        pytest.param(message(topic="order paid"), id="topic-space"),
        pytest.param(message(topic="order..paid"), id="topic-empty-word"),
        pytest.param(message(topic="order.*"), id="topic-wildcard"),
        pytest.param(message(topic="a" * 256), id="topic-too-long"),
        pytest.param(message(headers=["trace", "abc"]), id="headers-list"),
        pytest.param(message(headers="trace=abc"), id="headers-string"),
        pytest.param(message(headers={"trace": {"nested": 1}}), id="header-value-object"),
        pytest.param(message(headers={"trace": [1]}), id="header-value-list"),
        pytest.param(message(headers={"trace": None}), id="header-value-null"),
        pytest.param(message(headers={"": 1}), id="header-name-empty"),
        pytest.param(message(headers={"h" * 256: 1}), id="header-name-too-long"),
        pytest.param(message(key=7), id="key-number"),
        pytest.param(message(key="k" * 256), id="key-too-long"),
        pytest.param(message(priority=5), id="extra-field"),
        pytest.param({**message(), "id": 5}, id="id-number"),
        pytest.param(message(id=""), id="id-empty"),
        pytest.param(message(id="a b"), id="id-space"),
        pytest.param(message(id="a/b"), id="id-slash"),
        pytest.param(message(id="é"), id="id-non-ascii"),
        pytest.param(message(id="a\n"), id="id-trailing-newline"),
        pytest.param(message(id=LONG_ID), id="id-129-chars"),
        pytest.param(message(headers={"x-rmsg-attempt": 9}), id="reserved-header"),
        pytest.param(message(headers={"X-RMSG-Producer": "me"}), id="reserved-header-upper"),
        pytest.param(message(headers={"x-rmsg-custom": "a"}), id="reserved-header-prefix"),
        # what PostgreSQL or AMQP cannot hold must be refused up front, not fail later
        pytest.param(message(payload="a\x00b"), id="payload-nul"),
        pytest.param(message(payload={"a\x00": 1}), id="payload-nul-in-name"),
        pytest.param(message(payload=["\ud800"]), id="payload-lone-surrogate"),
        pytest.param(message(payload=float("nan")), id="payload-nan"),
        pytest.param(message(payload={"x": float("inf")}), id="payload-infinity"),
        pytest.param(message(headers={"trace": "a\x00"}), id="header-value-nul"),
        pytest.param(message(headers={"a\x00": "x"}), id="header-name-nul"),
        pytest.param(message(headers={"trace": "\udfff"}), id="header-value-surrogate"),
        pytest.param(message(headers={"\ud800": [1]}), id="bad-header-named-by-surrogate"),
        pytest.param(message(payload={"\ud800": 1}), id="payload-surrogate-in-name"),
        pytest.param(message(headers={"n": float("-inf")}), id="header-value-infinity"),
        pytest.param(message(headers={"n": 2**63}), id="header-int-over-64-bits"),
        pytest.param(message(headers={"n": -(2**63) - 1}), id="header-int-under-64-bits"),
        pytest.param(message(key="a\x00"), id="key-nul"),
    ],
)
async def test_invalid_prepare_is_422_and_stores_nothing(
    client: httpx.AsyncClient, db: asyncpg.Connection, body: Any
) -> None:
    r = await send(client, "POST", "/v1/messages", PRODUCER, raw=json.dumps(body).encode())
    assert_error(r, 422, "invalid_request")
    assert await stored(db) == 0


async def test_header_ints_at_the_64_bit_bounds_are_accepted(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    """The counterpart of the over-64-bits cases: the bound itself is fine end to end."""
    headers = {"max": 2**63 - 1, "min": -(2**63), "flag": True, "ratio": 0.5}
    r = await send(client, "POST", "/v1/messages", PRODUCER, message("b-1", headers=headers))
    assert r.status_code == 201, r.text
    await confirm(client, "b-1")
    assert await db.fetchval("SELECT status FROM rmsg_message WHERE id = 'b-1'") == "sent"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({}, id="no-messages"),
        pytest.param({"messages": []}, id="empty-batch"),
        pytest.param({"messages": message()}, id="messages-object"),
        pytest.param({"messages": None}, id="messages-null"),
        pytest.param({"messages": [message("b-1"), {"topic": "order.paid"}]}, id="item-no-payload"),
        pytest.param({"messages": [message("b-1"), message("b-2", topic=1)]}, id="item-topic-int"),
        pytest.param({"messages": [message("b-1", extra=1)]}, id="item-extra-field"),
        pytest.param({"messages": [message("b-1")], "atomic": True}, id="extra-field"),
        pytest.param({"messages": [message(LONG_ID)]}, id="item-id-129-chars"),
        pytest.param({"messages": [message("b 1")]}, id="item-id-space"),
        pytest.param(
            {"messages": [message("b-1"), message(headers={"x-rmsg-attempt": 2})]},
            id="item-reserved-header",
        ),
        pytest.param({"messages": [message("b-1", payload="\x00")]}, id="item-payload-nul"),
    ],
)
async def test_invalid_batch_prepare_is_422_and_stores_nothing(
    client: httpx.AsyncClient, db: asyncpg.Connection, body: Any
) -> None:
    r = await send(client, "POST", "/v1/batch/prepare", PRODUCER, body)
    assert_error(r, 422, "invalid_request")
    assert await stored(db) == 0


BATCH_ID_ROUTES = [
    pytest.param("/v1/batch/confirm", PRODUCER, id="confirm"),
    pytest.param("/v1/batch/cancel", PRODUCER, id="cancel"),
    pytest.param("/v1/batch/ack", INVENTORY, id="ack"),
]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({}, id="no-ids"),
        pytest.param({"ids": []}, id="empty-batch"),
        pytest.param({"ids": "p-1"}, id="ids-string"),
        pytest.param({"ids": {"p-1": True}}, id="ids-object"),
        pytest.param({"ids": None}, id="ids-null"),
        pytest.param({"ids": ["p-1", 7]}, id="id-number"),
        pytest.param({"ids": ["p-1", None]}, id="id-null"),
        pytest.param({"ids": ["p-1", ""]}, id="id-empty"),
        pytest.param({"ids": ["p-1", "p 1"]}, id="id-space"),
        pytest.param({"ids": ["p-1", "p-1\x00"]}, id="id-nul"),
        pytest.param({"ids": ["p-1", LONG_ID]}, id="id-129-chars"),
        pytest.param({"ids": ["p-1"], "force": True}, id="extra-field"),
        pytest.param(["p-1"], id="array-not-object"),
    ],
)
@pytest.mark.parametrize(("path", "token"), BATCH_ID_ROUTES)
async def test_invalid_batch_ids_are_422_and_change_nothing(
    client: httpx.AsyncClient,
    db: asyncpg.Connection,
    seeded: None,
    path: str,
    token: str,
    body: Any,
) -> None:
    before = await snapshot(db)
    r = await send(client, "POST", path, token, body)
    assert_error(r, 422, "invalid_request")
    assert await snapshot(db) == before


BODY_ROUTES = [
    pytest.param("/v1/messages", PRODUCER, id="prepare"),
    pytest.param("/v1/batch/prepare", PRODUCER, id="batch-prepare"),
    pytest.param("/v1/batch/confirm", PRODUCER, id="batch-confirm"),
    pytest.param("/v1/batch/cancel", PRODUCER, id="batch-cancel"),
    pytest.param("/v1/batch/ack", INVENTORY, id="batch-ack"),
]


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"{", id="truncated"),
        pytest.param(b"topic=order.paid", id="form-text"),
        pytest.param(b"{'topic': 'order.paid'}", id="single-quotes"),
        pytest.param(b'{"topic": "order.paid",}', id="trailing-comma"),
        pytest.param(b'{"topic": "order.paid"} {}', id="two-documents"),
        pytest.param(b'\xff\xfe{"topic": 1}', id="not-utf8"),
        pytest.param(b'{"topic": "order.\xe9"}', id="latin1-byte"),
        pytest.param(b'{"payload": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", id="nested-too-deep"),
    ],
)
@pytest.mark.parametrize(("path", "token"), BODY_ROUTES)
async def test_body_that_is_not_json_is_400(
    client: httpx.AsyncClient,
    db: asyncpg.Connection,
    seeded: None,
    path: str,
    token: str,
    raw: bytes,
) -> None:
    before = await snapshot(db)
    r = await send(client, "POST", path, token, raw=raw)
    assert_error(r, 400, "invalid_json")
    assert await snapshot(db) == before


@pytest.mark.parametrize(
    ("method", "path", "token"),
    [
        pytest.param("POST", "/v1/messages/{}/confirm", PRODUCER, id="confirm"),
        pytest.param("POST", "/v1/messages/{}/cancel", PRODUCER, id="cancel"),
        pytest.param("POST", "/v1/messages/{}/ack", INVENTORY, id="ack"),
        pytest.param("POST", "/v1/messages/{}/requeue", ADMIN, id="requeue"),
        pytest.param("GET", "/v1/messages/{}", ADMIN, id="get"),
    ],
)
@pytest.mark.parametrize(
    "id",
    [
        pytest.param("a%20b", id="space"),
        pytest.param("a%00b", id="nul"),
        pytest.param("%C3%A9", id="non-ascii"),
        pytest.param("a%0A", id="trailing-newline"),
        pytest.param(LONG_ID, id="129-chars"),
    ],
)
async def test_invalid_path_id_is_422(
    client: httpx.AsyncClient, db: asyncpg.Connection, method: str, path: str, token: str, id: str
) -> None:
    r = await send(client, method, path.format(id), token)
    assert_error(r, 422, "invalid_request")
    assert await stored(db) == 0


async def test_id_of_128_chars_is_accepted(client: httpx.AsyncClient) -> None:
    """The counterpart of the 129-char cases: the limit itself is a valid id."""
    await prepare(client, "a" * 128)
    r = await send(client, "GET", f"/v1/messages/{'a' * 128}", PRODUCER)
    assert r.status_code == 200, r.text


async def test_topic_with_no_subscriber_is_422(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    r = await send(client, "POST", "/v1/messages", PRODUCER, message(topic="payment.done"))
    assert_error(r, 422, "no_subscriber")
    assert await stored(db) == 0


# -- unknown messages and refused moves: 404 / 409 ---------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "token"),
    [
        pytest.param("POST", "/v1/messages/nope/confirm", PRODUCER, id="confirm"),
        pytest.param("POST", "/v1/messages/nope/cancel", PRODUCER, id="cancel"),
        pytest.param("POST", "/v1/messages/nope/ack", INVENTORY, id="ack"),
        pytest.param("GET", "/v1/messages/nope", PRODUCER, id="get-by-producer"),
        pytest.param("GET", "/v1/messages/nope", ADMIN, id="get-by-admin"),
        pytest.param("POST", "/v1/messages/nope/requeue", ADMIN, id="requeue"),
    ],
)
async def test_unknown_id_is_404(
    client: httpx.AsyncClient,
    db: asyncpg.Connection,
    seeded: None,
    method: str,
    path: str,
    token: str,
) -> None:
    before = await snapshot(db)
    r = await send(client, method, path, token)
    assert_error(r, 404, "not_found")
    assert await snapshot(db) == before


async def test_ack_by_a_group_without_a_delivery_is_404(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    await prepare(client, "c-1", topic="order.created")  # only 'credit' subscribes
    await confirm(client, "c-1")
    before = await snapshot(db)
    r = await send(client, "POST", "/v1/messages/c-1/ack", INVENTORY)
    assert_error(r, 404, "not_found")
    assert await snapshot(db) == before
    r = await send(client, "POST", "/v1/messages/c-1/ack", CREDIT)
    assert r.status_code == 200, r.text


async def test_ack_of_a_pending_message_is_409(
    client: httpx.AsyncClient, db: asyncpg.Connection, seeded: None
) -> None:
    before = await snapshot(db)
    r = await send(client, "POST", "/v1/messages/p-1/ack", INVENTORY)
    assert_error(r, 409, "not_sent")
    assert await snapshot(db) == before


@pytest.mark.parametrize(
    "id",
    [
        pytest.param("p-1", id="pending"),
        pytest.param("s-1", id="sent"),
        pytest.param("o-1", id="pending-of-other-producer"),
    ],
)
async def test_requeue_of_a_message_that_is_not_dead_is_409(
    client: httpx.AsyncClient, db: asyncpg.Connection, seeded: None, id: str
) -> None:
    before = await snapshot(db)
    r = await send(client, "POST", f"/v1/messages/{id}/requeue", ADMIN)
    assert_error(r, 409)
    assert await snapshot(db) == before


async def test_requeue_of_a_dead_message_is_accepted(
    client: httpx.AsyncClient, db: asyncpg.Connection, seeded: None
) -> None:
    """The counterpart of the not-dead cases: ``d-1`` died in check-back, so it goes back
    to ``pending`` for another round of check-back."""
    r = await send(client, "POST", "/v1/messages/d-1/requeue", ADMIN)
    assert r.status_code == 200, r.text
    assert await db.fetchval("SELECT status FROM rmsg_message WHERE id = 'd-1'") == "pending"


# -- sizes: 413 --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param("x" * (MAX_PAYLOAD - 1), id="one-byte-over"),
        pytest.param("é" * (MAX_PAYLOAD // 2), id="multibyte-counts-bytes"),
        pytest.param({"items": list(range(400))}, id="large-object"),
    ],
)
async def test_payload_over_max_payload_bytes_is_413(
    client: httpx.AsyncClient, db: asyncpg.Connection, payload: Any
) -> None:
    r = await send(client, "POST", "/v1/messages", PRODUCER, message("big", payload=payload))
    assert_error(r, 413, "payload_too_large")
    assert await stored(db) == 0


async def test_payload_of_exactly_max_payload_bytes_is_accepted(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    payload = "x" * (MAX_PAYLOAD - 2)  # with its quotes: exactly the limit
    r = await send(client, "POST", "/v1/messages", PRODUCER, message("edge", payload=payload))
    assert r.status_code == 201, r.text
    assert await stored(db) == 1


def padded(body: Any, size: int) -> bytes:
    """``body`` as JSON, padded with whitespace to ``size`` bytes: still valid and small
    once parsed, so only the request size limit can refuse it."""
    text = json.dumps(body).encode()
    return text + b" " * (size - len(text))


#: Every ``/v1`` call, each with a token it admits and a body that is valid for it (an
#: empty object where the call takes none): only the request size limit can refuse it.
OVERSIZE_BODIES = [
    pytest.param("POST", "/v1/messages", PRODUCER, message("big"), id="prepare"),
    pytest.param("POST", "/v1/messages/p-1/confirm", PRODUCER, {}, id="confirm"),
    pytest.param("POST", "/v1/messages/p-1/cancel", PRODUCER, {}, id="cancel"),
    pytest.param("POST", "/v1/messages/s-1/ack", INVENTORY, {}, id="ack"),
    pytest.param("POST", "/v1/messages/d-1/requeue", ADMIN, {}, id="requeue"),
    pytest.param(
        "POST", "/v1/batch/prepare", PRODUCER, {"messages": [message("big")]}, id="batch-prepare"
    ),
    pytest.param("POST", "/v1/batch/confirm", PRODUCER, {"ids": ["p-1"]}, id="batch-confirm"),
    pytest.param("POST", "/v1/batch/cancel", PRODUCER, {"ids": ["p-1"]}, id="batch-cancel"),
    pytest.param("POST", "/v1/batch/ack", INVENTORY, {"ids": ["s-1"]}, id="batch-ack"),
    pytest.param("GET", "/v1/messages/p-1", PRODUCER, {}, id="get"),
    pytest.param("GET", "/v1/messages", ADMIN, {}, id="list"),
    pytest.param("POST", "/v1/requeue", ADMIN, {}, id="requeue-all"),
    pytest.param("GET", "/v1/stats", ADMIN, {}, id="stats"),
]


@pytest.mark.parametrize(("method", "path", "token", "body"), OVERSIZE_BODIES)
async def test_request_over_max_request_bytes_with_content_length_is_413(
    client: httpx.AsyncClient,
    db: asyncpg.Connection,
    seeded: None,
    method: str,
    path: str,
    token: str,
    body: Any,
) -> None:
    before = await snapshot(db)
    r = await send(client, method, path, token, raw=padded(body, MAX_REQUEST + 1))
    assert r.request.headers["content-length"] == str(MAX_REQUEST + 1)
    assert_error(r, 413, "payload_too_large")
    assert await snapshot(db) == before


@pytest.mark.parametrize(("method", "path", "token", "body"), OVERSIZE_BODIES)
async def test_request_over_max_request_bytes_streamed_is_413(
    client: httpx.AsyncClient,
    db: asyncpg.Connection,
    seeded: None,
    method: str,
    path: str,
    token: str,
    body: Any,
) -> None:
    """Without a declared length too, and also where the call itself reads no body."""
    data = padded(body, MAX_REQUEST + 1)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 4096):
            yield data[start : start + 4096]

    before = await snapshot(db)
    headers = {**auth(token), "Content-Type": "application/json"}
    r = await client.request(method, path, content=chunks(), headers=headers)
    assert "content-length" not in r.request.headers
    assert r.request.headers["transfer-encoding"] == "chunked"
    assert_error(r, 413, "payload_too_large")
    assert await snapshot(db) == before


@pytest.mark.parametrize(
    "streamed", [pytest.param(False, id="declared"), pytest.param(True, id="streamed")]
)
async def test_request_of_exactly_max_request_bytes_is_accepted(
    client: httpx.AsyncClient, db: asyncpg.Connection, streamed: bool
) -> None:
    data = padded(message("edge"), MAX_REQUEST)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 4096):
            yield data[start : start + 4096]

    headers = {**auth(PRODUCER), "Content-Type": "application/json"}
    r = await client.post("/v1/messages", content=chunks() if streamed else data, headers=headers)
    assert r.status_code == 201, r.text
    assert await stored(db) == 1


@pytest.mark.parametrize(
    ("path", "token", "body"),
    [
        pytest.param(
            "/v1/batch/prepare",
            PRODUCER,
            {"messages": [message(f"b-{i}") for i in range(MAX_BATCH + 1)]},
            id="prepare",
        ),
        pytest.param(
            "/v1/batch/confirm",
            PRODUCER,
            {"ids": ["p-1", *(f"b-{i}" for i in range(MAX_BATCH))]},
            id="confirm",
        ),
        pytest.param(
            "/v1/batch/cancel",
            PRODUCER,
            {"ids": ["p-1", *(f"b-{i}" for i in range(MAX_BATCH))]},
            id="cancel",
        ),
        pytest.param(
            "/v1/batch/ack",
            INVENTORY,
            {"ids": ["s-1", *(f"b-{i}" for i in range(MAX_BATCH))]},
            id="ack",
        ),
    ],
)
async def test_batch_over_max_batch_is_413(
    client: httpx.AsyncClient,
    db: asyncpg.Connection,
    seeded: None,
    path: str,
    token: str,
    body: Any,
) -> None:
    before = await snapshot(db)
    r = await send(client, "POST", path, token, body)
    assert_error(r, 413, "payload_too_large")
    assert await snapshot(db) == before


async def test_batch_of_exactly_max_batch_is_accepted(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    body = {"messages": [message(f"b-{i}") for i in range(MAX_BATCH)]}
    r = await send(client, "POST", "/v1/batch/prepare", PRODUCER, body)
    assert r.status_code == 200, r.text
    assert await stored(db) == MAX_BATCH


@pytest.mark.parametrize(
    ("path", "token", "body"),
    [
        pytest.param(
            "/v1/batch/prepare",
            PRODUCER,
            {"messages": [message("b-1"), message("b-2"), message("b-1")]},
            id="prepare",
        ),
        pytest.param("/v1/batch/confirm", PRODUCER, {"ids": ["p-1", "p-1"]}, id="confirm"),
        pytest.param("/v1/batch/cancel", PRODUCER, {"ids": ["p-1", "o-1", "p-1"]}, id="cancel"),
        pytest.param("/v1/batch/ack", INVENTORY, {"ids": ["s-1", "s-1"]}, id="ack"),
    ],
)
async def test_batch_naming_an_id_twice_is_422(
    client: httpx.AsyncClient,
    db: asyncpg.Connection,
    seeded: None,
    path: str,
    token: str,
    body: Any,
) -> None:
    before = await snapshot(db)
    r = await send(client, "POST", path, token, body)
    assert_error(r, 422, "duplicate_id")
    assert await snapshot(db) == before


# -- per-item errors in batches: 200 -----------------------------------------------------


def outcome(item: dict[str, Any]) -> tuple[str, bool, str | None]:
    """An item as (id, ok, status or error code); a failed item has the error shape."""
    if item["ok"]:
        assert item["error"] is None, item
        return item["id"], True, item["status"]
    assert sorted(item["error"]) == ["code", "message"] and item["error"]["message"], item
    return item["id"], False, item["error"]["code"]


async def statuses(db: asyncpg.Connection) -> dict[str, str]:
    rows = await db.fetch("SELECT id, status FROM rmsg_message")
    return {r["id"]: r["status"] for r in rows}


async def test_batch_confirm_answers_per_item(
    client: httpx.AsyncClient, db: asyncpg.Connection, seeded: None
) -> None:
    r = await send(client, "POST", "/v1/batch/confirm", PRODUCER, {"ids": ["p-1", "nope", "o-1"]})
    assert r.status_code == 200, r.text
    assert [outcome(i) for i in r.json()["results"]] == [
        ("p-1", True, "sent"),
        ("nope", False, "not_found"),
        ("o-1", False, "forbidden"),
    ]
    assert await statuses(db) == {"p-1": "sent", "s-1": "sent", "d-1": "dead", "o-1": "pending"}


async def test_batch_cancel_answers_per_item(
    client: httpx.AsyncClient, db: asyncpg.Connection, seeded: None
) -> None:
    ids = ["p-1", "nope", "o-1", "s-1"]
    r = await send(client, "POST", "/v1/batch/cancel", PRODUCER, {"ids": ids})
    assert r.status_code == 200, r.text
    assert [outcome(i) for i in r.json()["results"]] == [
        ("p-1", True, "cancelled"),
        ("nope", False, "not_found"),
        ("o-1", False, "forbidden"),
        ("s-1", False, "already_sent"),
    ]
    assert await statuses(db) == {
        "p-1": "cancelled",
        "s-1": "sent",
        "d-1": "dead",
        "o-1": "pending",
    }


async def test_batch_ack_answers_per_item(
    client: httpx.AsyncClient, db: asyncpg.Connection, seeded: None
) -> None:
    await prepare(client, "c-1", topic="order.created")  # only 'credit' subscribes
    await confirm(client, "c-1")
    r = await send(
        client, "POST", "/v1/batch/ack", INVENTORY, {"ids": ["s-1", "nope", "p-1", "c-1"]}
    )
    assert r.status_code == 200, r.text
    assert [outcome(i) for i in r.json()["results"]] == [
        ("s-1", True, "done"),
        ("nope", False, "not_found"),
        ("p-1", False, "not_sent"),
        ("c-1", False, "not_found"),
    ]
    rows = await db.fetch(
        "SELECT message_id, status FROM rmsg_delivery WHERE group_name = $1", "inventory"
    )
    assert {r["message_id"]: r["status"] for r in rows} == {"s-1": "done"}


async def test_batch_prepare_answers_per_item_and_stores_only_the_good(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    body = {
        "messages": [
            message("b-1"),
            message("b-2", topic="payment.done"),
            message("b-3", payload="x" * MAX_PAYLOAD),
        ]
    }
    r = await send(client, "POST", "/v1/batch/prepare", PRODUCER, body)
    assert r.status_code == 200, r.text
    assert [outcome(i) for i in r.json()["results"]] == [
        ("b-1", True, "pending"),
        ("b-2", False, "no_subscriber"),
        ("b-3", False, "payload_too_large"),
    ]
    assert await statuses(db) == {"b-1": "pending"}


async def test_batch_prepare_of_another_producers_id_is_an_id_conflict_and_leaves_it(
    client: httpx.AsyncClient, db: asyncpg.Connection, seeded: None
) -> None:
    """``o-1`` is OTHER_PRODUCER's, prepared with the very body the batch sends: still a
    conflict for that item alone; the rest of the batch is stored."""
    rows = "SELECT * FROM rmsg_message WHERE id = 'o-1'"
    before = [tuple(r) for r in await db.fetch(rows)]
    body = {"messages": [message("b-1"), message("o-1"), message("b-2")]}
    r = await send(client, "POST", "/v1/batch/prepare", PRODUCER, body)
    assert r.status_code == 200, r.text
    assert [outcome(i) for i in r.json()["results"]] == [
        ("b-1", True, "pending"),
        ("o-1", False, "id_conflict"),
        ("b-2", True, "pending"),
    ]
    assert [tuple(r) for r in await db.fetch(rows)] == before
    owners = await db.fetch("SELECT id, producer FROM rmsg_message WHERE id LIKE 'b-%'")
    assert {r["id"]: r["producer"] for r in owners} == {"b-1": "order", "b-2": "order"}
    assert await statuses(db) == {
        "p-1": "pending",
        "s-1": "sent",
        "d-1": "dead",
        "o-1": "pending",
        "b-1": "pending",
        "b-2": "pending",
    }


# -- listing and requeue-all query strings -----------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("abc", id="not-base64-json"),
        pytest.param("!!!", id="not-base64"),
        pytest.param("é", id="non-ascii"),
        pytest.param(cursor(5), id="number"),
        pytest.param(cursor(["2024-01-01T00:00:00+00:00"]), id="one-element"),
        pytest.param(cursor(["yesterday", "m-1"]), id="not-a-date"),
        pytest.param(cursor([20240101, "m-1"]), id="date-number"),
        pytest.param(cursor(["0001-01-01T00:00:00+14:00", "m-1"]), id="date-before-year-1-utc"),
        pytest.param(cursor(["9999-12-31T23:59:59-14:00", "m-1"]), id="date-after-9999-utc"),
        pytest.param(cursor(["2024-01-01T00:00:00+00:00", "m\x00"]), id="id-nul"),
        pytest.param(cursor(["2024-01-01T00:00:00+00:00", ["m-1"]]), id="id-list"),
    ],
)
async def test_bad_cursor_is_400(client: httpx.AsyncClient, seeded: None, value: str) -> None:
    r = await client.get("/v1/messages", params={"cursor": value}, headers=auth(ADMIN))
    assert_error(r, 400, "bad_cursor")


async def test_cursor_handed_out_is_accepted(client: httpx.AsyncClient, seeded: None) -> None:
    """The counterpart of the bad-cursor cases: the service's own cursor pages on."""
    first = await client.get("/v1/messages", params={"limit": 2}, headers=auth(ADMIN))
    assert first.status_code == 200, first.text
    params = {"limit": 2, "cursor": first.json()["next_cursor"]}
    second = await client.get("/v1/messages", params=params, headers=auth(ADMIN))
    assert second.status_code == 200, second.text
    ids = [m["id"] for r in (first, second) for m in r.json()["messages"]]
    assert sorted(ids) == ["d-1", "o-1", "p-1", "s-1"]


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"status": "bogus"}, id="status-unknown"),
        pytest.param({"status": "SENT"}, id="status-upper-case"),
        pytest.param({"limit": "0"}, id="limit-0"),
        pytest.param({"limit": "-1"}, id="limit-negative"),
        pytest.param({"limit": "5000"}, id="limit-5000"),
        pytest.param({"limit": "ten"}, id="limit-not-int"),
        pytest.param({"topic": "order paid"}, id="topic-invalid"),
        pytest.param({"topic": "t" * 256}, id="topic-too-long"),
        pytest.param({"group": "in\x00ventory"}, id="group-nul"),
        pytest.param({"group": "g" * 300}, id="group-too-long"),
    ],
)
async def test_bad_list_query_is_422(
    client: httpx.AsyncClient, seeded: None, params: dict[str, str]
) -> None:
    r = await client.get("/v1/messages", params=params, headers=auth(ADMIN))
    assert_error(r, 422, "invalid_request")


@pytest.mark.parametrize(
    ("params", "code"),
    [
        pytest.param({"topic": "order paid"}, "invalid_request", id="topic-invalid"),
        pytest.param({"group": "nobody"}, "unknown_group", id="group-unknown"),
        pytest.param({"group": "in\x00ventory"}, "invalid_request", id="group-nul"),
    ],
)
async def test_bad_requeue_all_query_is_422(
    client: httpx.AsyncClient,
    db: asyncpg.Connection,
    seeded: None,
    params: dict[str, str],
    code: str,
) -> None:
    before = await snapshot(db)
    r = await client.post("/v1/requeue", params=params, headers=auth(ADMIN))
    assert_error(r, 422, code)
    assert await snapshot(db) == before


# -- routing: 404 / 405 ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        pytest.param("GET", "/v1/nope", id="unknown-path"),
        pytest.param("POST", "/v2/messages", id="unknown-version"),
        pytest.param("POST", "/v1/messages/p-1/retry", id="unknown-action"),
        pytest.param("GET", "/v1/messages/a/b", id="id-with-slash"),
        pytest.param("GET", "/", id="root"),
    ],
)
async def test_unknown_route_is_404(
    client: httpx.AsyncClient, seeded: None, method: str, path: str
) -> None:
    r = await send(client, method, path, ADMIN)
    assert_error(r, 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        pytest.param("GET", "/v1/messages/p-1/confirm", id="get-confirm"),
        pytest.param("GET", "/v1/messages/p-1/ack", id="get-ack"),
        pytest.param("DELETE", "/v1/messages/p-1", id="delete-message"),
        pytest.param("PUT", "/v1/messages", id="put-messages"),
        pytest.param("GET", "/v1/batch/confirm", id="get-batch-confirm"),
        pytest.param("POST", "/v1/stats", id="post-stats"),
    ],
)
async def test_wrong_method_is_405(
    client: httpx.AsyncClient, db: asyncpg.Connection, seeded: None, method: str, path: str
) -> None:
    before = await snapshot(db)
    r = await send(client, method, path, ADMIN)
    assert_error(r, 405, "method_not_allowed")
    assert r.headers.get("allow"), "a 405 must list the allowed methods"
    assert method not in r.headers["allow"]
    assert await snapshot(db) == before
