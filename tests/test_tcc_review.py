"""Findings of a review of the TCC coordinator, each pinned by a test that failed before
its fix: hostile participant answers, a payload at the limit, hostile list cursors."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import asyncpg
import httpx
import pytest
from fastapi import FastAPI, Request, Response

from reliable_msg.errors import CheckBackError, ServiceUnavailable
from reliable_msg.message import DueCheck
from reliable_msg.sdk.client import RetryPolicy, ServiceClient
from reliable_msg.service.checkback_client import CheckBackClient
from reliable_msg.service.settings import (
    CheckBackSettings,
    ProducerSettings,
    Settings,
    TccSettings,
)
from reliable_msg.service.tcc.store import TccStore
from reliable_msg.service.usecases import payload_text
from reliable_msg.tcc import Op, proof
from tests.conftest import ADMIN, auth
from tests.helpers.tcc import (
    TOKENS,
    branch,
    events,
    insert,
    participant,
    reset,
    sdk_app,
    serving,
    transaction,
)
from tests.test_api_errors import assert_error
from tests.test_tcc_driver import configure, driver, summary


@pytest.fixture
async def tcc_db(db: asyncpg.Connection) -> asyncpg.Connection:
    await reset(db)
    return db


@pytest.fixture
async def nul_answering(tcc_db: asyncpg.Connection) -> AsyncIterator[str]:
    """A credit participant answering every Confirm and Cancel 500 with a NUL byte in
    its body (PostgreSQL text cannot hold one)."""
    app = FastAPI()

    async def broken(request: Request) -> Response:
        return Response(b"oops\x00here", status_code=500, media_type="text/plain")

    for op in (Op.CONFIRM, Op.CANCEL):
        app.add_api_route(f"/credit/{op.value}", broken, methods=["POST"])
    async with serving(app) as url:
        yield url


async def test_an_answer_with_a_nul_byte_is_recorded_as_a_failed_call(
    make_settings: Callable[..., Settings], nul_answering: str, tcc_db: asyncpg.Connection
) -> None:
    """Its event row, the branch's attempt and backoff, and the lease released: not a
    round that fails to record, keeps the lease and calls again with no trace."""
    settings = configure(make_settings, {"credit": nul_answering})
    await insert(tcc_db, "nul-1", "confirming", [("b1", "credit")])
    async with driver(settings) as d:
        assert await d.run_once() == 1
    row = await branch(tcc_db, "nul-1", "b1")
    assert (row["status"], row["attempts"], row["last_status"]) == ("registered", 1, 500)
    assert row["next_try_at"] is not None and "\x00" not in row["last_error"]
    assert row["last_error"].startswith("HTTP 500: oops")
    tx = await transaction(tcc_db, "nul-1")
    assert (tx["attempts"], tx["lease_owner"]) == (1, None)
    assert tx["next_try_at"] == row["next_try_at"]
    assert summary(await events(tcc_db, "nul-1")) == [("b1", "confirm", "failed", 500)]


@pytest.fixture
async def malformed(tcc_db: asyncpg.Connection) -> AsyncIterator[str]:
    """A credit participant answering every call with a malformed HTTP response (a header
    line without a colon): aiohttp raises ClientResponseError, whose repr holds the
    request's headers, the Authorization proof among them."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nBad Header Line\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}"


async def test_a_malformed_answer_leaks_no_proof_into_the_events_or_the_log(
    make_settings: Callable[..., Settings],
    malformed: str,
    tcc_db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The event's error and the branch's last error are read by the initiator (GET):
    the Confirm proof must not be in them, nor in the log."""
    settings = configure(make_settings, {"credit": malformed})
    await insert(tcc_db, "leak-1", "confirming", [("b1", "credit")])
    secret = proof(TOKENS["credit"], "leak-1", "b1", Op.CONFIRM)
    with caplog.at_level(logging.DEBUG):
        async with driver(settings) as d:
            assert await d.run_once() == 1
    row = await branch(tcc_db, "leak-1", "b1")
    assert (row["status"], row["attempts"], row["last_status"]) == ("registered", 1, None)
    assert row["last_error"].startswith("call failed: ")
    assert secret not in row["last_error"] and "Authorization" not in row["last_error"]
    (event,) = await events(tcc_db, "leak-1")
    assert (event["outcome"], event["error"]) == ("failed", row["last_error"])
    assert secret not in caplog.text


async def test_an_answer_echoing_the_authorization_keeps_the_proof_out_of_the_events(
    make_settings: Callable[..., Settings], tcc_db: asyncpg.Connection
) -> None:
    app = FastAPI()

    async def echo(request: Request) -> Response:
        return Response(f"bad: {request.headers['authorization']}", status_code=401)

    app.add_api_route("/credit/cancel", echo, methods=["POST"])
    await insert(tcc_db, "leak-2", "cancelling", [("b1", "credit")])
    async with serving(app) as url, driver(configure(make_settings, {"credit": url})) as d:
        assert await d.run_once() == 1
    row = await branch(tcc_db, "leak-2", "b1")
    assert (row["last_status"], row["last_error"]) == (401, "HTTP 401: bad: Bearer <proof>")
    assert [e["error"] for e in await events(tcc_db, "leak-2")] == [row["last_error"]]


async def test_a_payload_at_the_coordinator_s_limit_is_confirmed_by_a_default_participant(
    make_settings: Callable[..., Settings], pool: asyncpg.Pool, tcc_db: asyncpg.Connection
) -> None:
    """The coordinator takes a payload up to tcc.max_payload_bytes as compact UTF-8 JSON;
    the SDK's participant, with its default body bound, must take the Confirm that carries
    it, or the branch is retried for ever (413 each time) and never confirmed."""
    limit = TccSettings().max_payload_bytes
    payload = {"note": "数" * ((limit - 11) // 3)}
    assert limit - 3 < len(payload_text(payload).encode()) <= limit
    await insert(tcc_db, "big-1", "confirming", [])
    await tcc_db.execute(
        "INSERT INTO rmsg_tcc_branch (gid, branch, participant, payload, status)"
        " VALUES ('big-1', 'b1', 'inventory', $1::jsonb, 'registered')",
        payload_text(payload),
    )
    async with serving(sdk_app(participant(pool, "inventory"))) as url:
        async with driver(configure(make_settings, {"inventory": url})) as d:
            assert await d.run_once() == 1
    row = await branch(tcc_db, "big-1", "b1")
    assert (row["status"], row["last_status"], row["last_error"]) == ("confirmed", 200, None)
    assert (await transaction(tcc_db, "big-1"))["status"] == "confirmed"


async def test_a_malformed_check_back_answer_leaks_no_producer_token(malformed: str) -> None:
    """The same repr in the check-back client carried the producer's own token into the
    error, which becomes the message's last error (API, dashboard) and a log line."""
    token = "order-producer-secret-token"
    producer = ProducerSettings(check_url=f"{malformed}/check", token=token)
    client = CheckBackClient(CheckBackSettings())
    await client.start()
    try:
        with pytest.raises(CheckBackError) as raised:
            await client.ask(producer, DueCheck("m-1", "orders", "order", datetime.now(UTC), 0))
    finally:
        await client.close()
    assert raised.value.message.startswith("check-back call failed: ")
    assert token not in raised.value.message


async def test_a_malformed_service_answer_leaks_no_token_from_the_sdk_client(
    malformed: str,
) -> None:
    """The SDK's client (the initiator's and the producer's) made the same repr of its
    failure: its error, which the application logs, held the producer's token."""
    token = "order-producer-secret-token"
    async with ServiceClient(malformed, token, retry=RetryPolicy(attempts=1)) as client:
        with pytest.raises(ServiceUnavailable) as raised:
            await client.get("m-1")
    assert raised.value.message.startswith("GET /v1/messages/m-1: ")
    assert token not in raised.value.message


async def test_a_cursor_of_deeply_nested_json_is_a_bad_cursor(
    client: httpx.AsyncClient, tcc_db: asyncpg.Connection
) -> None:
    """Not a 500: json.loads raises RecursionError on it, which is no ValueError."""
    cursor = base64.urlsafe_b64encode(b"[" * 5000).decode().rstrip("=")
    r = await client.get("/v1/tcc/transactions", params={"cursor": cursor}, headers=auth(ADMIN))
    assert_error(r, 400, "bad_cursor")


async def test_the_events_left_out_of_a_read_are_only_those_older_than_it_shows(
    pool: asyncpg.Pool, tcc_db: asyncpg.Connection, database_url: str
) -> None:
    """A read of the latest events while the driver writes more: the count it says is
    left out is of the events older than the ones it read, not of every event by the
    time it counted (which said newer ones were left out, as the dashboard shows)."""
    await insert(tcc_db, "log-1", "confirming", [("b1", "credit")])
    store = TccStore(pool, instance="test", stalled_after=60.0)
    writer = await asyncpg.connect(database_url)
    stop = asyncio.Event()

    async def write() -> None:
        while not stop.is_set():
            await writer.execute(
                "INSERT INTO rmsg_tcc_event (gid, branch, op, outcome, instance)"
                " VALUES ('log-1', 'b1', 'confirm', 'failed', 'test')"
            )

    writing = asyncio.create_task(write())
    wrong: list[tuple[int, int]] = []
    try:
        for _ in range(300):
            tx = await store.get("log-1", last_events=3)
            assert tx is not None
            if len(tx.events) < 3:
                continue
            older = await tcc_db.fetchval(
                "SELECT count(*) FROM rmsg_tcc_event WHERE gid = 'log-1' AND id < $1",
                tx.events[0].id,
            )
            if tx.events_left_out != older:
                wrong.append((tx.events_left_out, older))
    finally:
        stop.set()
        await writing
        await writer.close()
    assert wrong == []
