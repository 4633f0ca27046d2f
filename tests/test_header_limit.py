"""A message's AMQP header must fit in one frame: bounded at prepare (413), and a stored
message whose header cannot fit goes ``dead`` at publish without costing RabbitMQ its
connection, so the other messages keep flowing and the switch stays normal."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest

from reliable_msg import constants
from reliable_msg.errors import ConfigError
from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings, load_settings
from tests.conftest import ADMIN, PRODUCER, auth
from tests.helpers import rabbit
from tests.helpers.checkback import ProducerEndpoint, checked_at
from tests.helpers.waiting import wait_until

#: ``max_header_bytes`` of these tests.
LIMIT = 4096
#: A header value far over RabbitMQ's frame_max (128 KiB by default).
HUGE = "h" * 200_000


@pytest.fixture
def settings(
    make_settings: Callable[..., Settings], endpoint: tuple[ProducerEndpoint, int]
) -> Settings:
    _, port = endpoint
    return make_settings(
        # Room in the request for the 200 KB header: the header limit must refuse it.
        max_request_bytes=1024 * 1024,
        max_header_bytes=LIMIT,
        producers=checked_at(port, PRODUCER),
    )


def message(id: str, **headers: Any) -> dict[str, Any]:
    return {"id": id, "topic": "order.paid", "payload": {"n": 1}, "headers": headers}


async def post(client: httpx.AsyncClient, path: str, body: Any = None) -> httpx.Response:
    return await client.post(path, json=body, headers=auth(PRODUCER))


async def status(db: asyncpg.Connection, id: str) -> tuple[str, str | None]:
    row = await db.fetchrow("SELECT status, last_error FROM rmsg_message WHERE id = $1", id)
    assert row is not None
    return row["status"], row["last_error"]


async def test_prepare_refuses_headers_over_max_header_bytes(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    r = await post(client, "/v1/messages", message("huge", big=HUGE))
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert error["code"] == "headers_too_large"
    assert str(LIMIT) in error["message"] and "max_header_bytes" in error["message"]

    # Just over the limit is refused too; well under it is taken.
    r = await post(client, "/v1/messages", message("over", big="h" * LIMIT))
    assert r.status_code == 413, r.text
    r = await post(client, "/v1/messages", message("under", big="h" * (LIMIT // 2)))
    assert r.status_code == 201, r.text
    assert [r["id"] for r in await db.fetch("SELECT id FROM rmsg_message")] == ["under"]


async def test_batch_prepare_refuses_only_the_item_over_max_header_bytes(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    body = {"messages": [message("b-1", a="x"), message("b-2", big=HUGE), message("b-3")]}
    r = await post(client, "/v1/batch/prepare", body)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [(i["id"], i["ok"], i["created"]) for i in results] == [
        ("b-1", True, True),
        ("b-2", False, None),
        ("b-3", True, True),
    ]
    assert results[1]["error"]["code"] == "headers_too_large"
    assert str(LIMIT) in results[1]["error"]["message"]
    rows = await db.fetch("SELECT id FROM rmsg_message ORDER BY id")
    assert [r["id"] for r in rows] == ["b-1", "b-3"]


async def store_huge_header(client: httpx.AsyncClient, db: asyncpg.Connection, id: str) -> None:
    """A pending message whose stored header is far over frame_max: a row from before
    the limit existed, or from a limit raised by configuration."""
    r = await post(client, "/v1/messages", message(id))
    assert r.status_code == 201, r.text
    await db.execute(
        "UPDATE rmsg_message SET headers = $2::jsonb WHERE id = $1", id, json.dumps({"b": HUGE})
    )


async def assert_rabbitmq_still_serves(
    client: httpx.AsyncClient, runtime: Runtime, amqp: aio_pika.abc.AbstractConnection, id: str
) -> None:
    """A normal message confirmed right after is sent, the connection stayed up, and no
    failure counted toward the degradation switch."""
    assert runtime.publisher.connected
    r = await post(client, "/v1/messages", message(id))
    assert r.status_code == 201, r.text
    r = await post(client, f"/v1/messages/{id}/confirm")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "sent"
    assert runtime.publisher.failures == 0
    assert not runtime.publisher.degraded
    got = await rabbit.drain(amqp, runtime.settings.queue_name("inventory"), wait=0.3)
    assert [m.message_id for m in got] == [id]


async def test_confirm_of_a_stored_huge_header_makes_it_dead_and_keeps_rabbitmq(
    client: httpx.AsyncClient,
    runtime: Runtime,
    db: asyncpg.Connection,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    await store_huge_header(client, db, "huge")
    r = await post(client, "/v1/messages/huge/confirm")
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "dead"
    assert "frame_max" in error["message"]
    state, reason = await status(db, "huge")
    assert state == "dead" and reason is not None and "frame_max" in reason
    await assert_rabbitmq_still_serves(client, runtime, amqp, "normal")

    # Asked again, it stays dead and still costs nothing.
    r = await post(client, "/v1/messages/huge/confirm")
    assert r.status_code == 409 and r.json()["error"]["code"] == "dead", r.text
    assert runtime.publisher.connected


async def test_check_back_of_a_stored_huge_header_makes_it_dead_and_keeps_rabbitmq(
    client: httpx.AsyncClient,
    runtime: Runtime,
    db: asyncpg.Connection,
    amqp: aio_pika.abc.AbstractConnection,
    endpoint: tuple[ProducerEndpoint, int],
) -> None:
    producer, _ = endpoint
    producer.answers["huge"] = "committed"
    await store_huge_header(client, db, "huge")

    async def dead() -> bool:
        await runtime.checkback.run_once()
        return (await status(db, "huge"))[0] == "dead"

    await wait_until(dead, within=10, every=0.1)
    _, reason = await status(db, "huge")
    assert reason is not None and "frame_max" in reason
    assert producer.calls["huge"] == 1
    await assert_rabbitmq_still_serves(client, runtime, amqp, "normal")


def test_max_header_bytes_must_fit_in_rabbitmqs_frame_max() -> None:
    with pytest.raises(ConfigError, match="max_header_bytes"):
        load_settings(None, max_header_bytes=constants.AMQP_FRAME_MAX)
    fits = constants.AMQP_FRAME_MAX - constants.HEADER_GROWTH
    assert load_settings(None, max_header_bytes=fits).max_header_bytes == fits
    assert load_settings(None).max_header_bytes == 16 * 1024


async def test_redelivery_of_a_header_grown_past_frame_max_is_dead_at_once(
    client: httpx.AsyncClient,
    runtime: Runtime,
    db: asyncpg.Connection,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    """A sent message whose stored header no longer fits (RabbitMQ's frame_max lowered
    since, say): its redeliveries die at once, and an admin's requeue says why."""
    r = await post(client, "/v1/messages", message("grown"))
    assert r.status_code == 201, r.text
    r = await post(client, "/v1/messages/grown/confirm")
    assert r.status_code == 200, r.text
    await db.execute(
        "UPDATE rmsg_message SET headers = $1::jsonb WHERE id = 'grown'", json.dumps({"b": HUGE})
    )

    async def dead() -> bool:
        await runtime.redelivery.run_once()
        return (await status(db, "grown"))[0] == "dead"

    await wait_until(dead, within=10, every=0.05)
    rows = await db.fetch(
        "SELECT status, attempts, last_error FROM rmsg_delivery WHERE message_id = 'grown'"
    )
    assert {(r["status"], r["attempts"]) for r in rows} == {("dead", 1)}
    assert all("frame_max" in r["last_error"] for r in rows)

    r = await client.post("/v1/messages/grown/requeue", headers=auth(ADMIN))
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "unpublishable"
    assert (await status(db, "grown"))[0] == "dead"
    await rabbit.drain(amqp, runtime.settings.queue_name("inventory"), wait=0.2)
    await assert_rabbitmq_still_serves(client, runtime, amqp, "normal")
