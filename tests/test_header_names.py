"""Header names are AMQP field-table short strings: at most 128 bytes of UTF-8, whatever
their length in characters. Over a real HTTP server, PostgreSQL and RabbitMQ."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aio_pika
import asyncpg
import httpx
import pytest

from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from tests.conftest import PRODUCER, auth
from tests.helpers import rabbit


@pytest.fixture
async def http(service_url: str, db: asyncpg.Connection) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=service_url, headers=auth(PRODUCER)) as c:
        yield c


def message(id: str, name: str) -> dict[str, object]:
    return {"id": id, "topic": "order.paid", "payload": {}, "headers": {name: "v"}}


@pytest.mark.parametrize(
    "name",
    [
        "é" * 100,  # 100 characters, 200 bytes
        "€" * 43,  # 43 characters, 129 bytes
        "h" * 129,
        "h" * 300,  # over the 255 characters that used to answer first
    ],
)
async def test_a_header_name_over_128_bytes_is_refused_with_the_byte_limit(
    http: httpx.AsyncClient, db: asyncpg.Connection, name: str
) -> None:
    for path, body in [
        ("/v1/messages", message("h-1", name)),
        ("/v1/batch/prepare", {"messages": [message("h-1", name)]}),
    ]:
        r = await http.post(path, json=body)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "invalid_request"
        assert "header names over 128 bytes" in r.json()["error"]["message"]
    assert await db.fetchval("SELECT count(*) FROM rmsg_message") == 0


async def test_a_header_name_of_exactly_128_bytes_is_taken_and_published(
    http: httpx.AsyncClient,
    runtime: Runtime,
    settings: Settings,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    name = "é" * 64
    assert len(name.encode()) == 128
    r = await http.post("/v1/messages", json=message("h-2", name))
    assert r.status_code == 201, r.text
    r = await http.post("/v1/messages/h-2/confirm")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "sent"
    [got] = await rabbit.drain(amqp, settings.queue_name("inventory"), wait=0.3)
    assert got.headers[name] == "v"
