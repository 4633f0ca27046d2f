"""The core flow against the real services: prepare, confirm, publish, ack."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import aio_pika
import asyncpg
import httpx
import pytest

from reliable_msg.harness.proxy import FaultProxy
from reliable_msg.service.api import create_app
from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from reliable_msg.transports.redis import delete_namespace
from tests.conftest import ADMIN, AMQP_URL, GROUP_TOKENS, PRODUCER, auth
from tests.helpers import rabbit
from tests.helpers.waiting import wait_until

PAID = {"order_id": 42, "amount": "19.90", "member": 7}


async def prepare(client: httpx.AsyncClient, id: str, **extra: object) -> httpx.Response:
    body = {"id": id, "topic": "order.paid", "payload": PAID, **extra}
    return await client.post("/v1/messages", json=body, headers=auth(PRODUCER))


async def confirm(client: httpx.AsyncClient, id: str) -> httpx.Response:
    return await client.post(f"/v1/messages/{id}/confirm", headers=auth(PRODUCER))


async def status_of(db: asyncpg.Connection, id: str) -> str:
    status: str = await db.fetchval("SELECT status FROM rmsg_message WHERE id = $1", id)
    return status


@pytest.fixture
def settings(make_settings: Callable[..., Settings], request: pytest.FixtureRequest) -> Settings:
    # The wire-format test runs on the production default, quorum queues.
    quorum = request.node.name.startswith("test_confirmed_message_reaches")
    return make_settings(queue_type="quorum" if quorum else "classic")


async def test_confirmed_message_reaches_every_group_queue_with_wire_properties(
    client: httpx.AsyncClient,
    settings: Settings,
    amqp: aio_pika.abc.AbstractConnection,
    db: asyncpg.Connection,
) -> None:
    async with amqp.channel() as channel:
        # A passive declare with another queue type would fail: these are quorum queues.
        for group in ("inventory", "credit", "wms"):
            await channel.declare_queue(
                settings.queue_name(group),
                durable=True,
                arguments={
                    "x-queue-type": "quorum",
                    "x-dead-letter-exchange": settings.dead_letter_exchange,
                    "x-dead-letter-routing-key": group,
                },
            )
    r = await prepare(client, "m-1", headers={"trace": "abc"}, key="member-7")
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "pending"
    assert await status_of(db, "m-1") == "pending"

    r = await confirm(client, "m-1")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "sent"
    assert await status_of(db, "m-1") == "sent"

    for group in ("inventory", "credit", "wms"):
        [message] = await rabbit.drain(amqp, settings.queue_name(group), wait=0.3)
        assert json.loads(message.body) == PAID
        assert message.message_id == "m-1"
        assert message.type == "order.paid"
        assert message.content_type == "application/json"
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.timestamp is not None
        assert message.headers["x-rmsg-attempt"] == 1
        assert message.headers["x-rmsg-producer"] == "order"
        assert message.headers["x-rmsg-key"] == "member-7"
        assert message.headers["trace"] == "abc"

    rows = await db.fetch(
        "SELECT group_name, status, attempts FROM rmsg_delivery WHERE message_id = 'm-1'"
        " ORDER BY group_name"
    )
    assert [(r["group_name"], r["status"], r["attempts"]) for r in rows] == [
        ("credit", "sent", 1),
        ("inventory", "sent", 1),
        ("wms", "sent", 1),
    ]


async def test_message_is_done_when_every_group_acked(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    await prepare(client, "m-2")
    await confirm(client, "m-2")
    for i, group in enumerate(("inventory", "credit", "wms")):
        assert await status_of(db, "m-2") == "sent", f"done before {group} acked"
        r = await client.post("/v1/messages/m-2/ack", headers=auth(GROUP_TOKENS[group]))
        assert r.status_code == 200, r.text
        assert r.json() == {"id": "m-2", "group": group, "status": "done"}
        if i == 0:  # acking twice changes nothing
            again = await client.post("/v1/messages/m-2/ack", headers=auth(GROUP_TOKENS[group]))
            assert again.status_code == 200
    assert await status_of(db, "m-2") == "done"
    assert await db.fetchval("SELECT remaining FROM rmsg_message WHERE id = 'm-2'") == 0


async def test_concurrent_acks_of_all_groups_finish_the_message(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    ids = [f"c-{i}" for i in range(30)]
    for id in ids:
        await prepare(client, id)
    r = await client.post("/v1/batch/confirm", json={"ids": ids}, headers=auth(PRODUCER))
    assert all(item["ok"] for item in r.json()["results"])

    async def ack_all(group: str) -> None:
        r = await client.post("/v1/batch/ack", json={"ids": ids}, headers=auth(GROUP_TOKENS[group]))
        assert all(item["ok"] for item in r.json()["results"]), r.text

    await asyncio.gather(*(ack_all(g) for g in ("inventory", "credit", "wms")))
    statuses = await db.fetch("SELECT DISTINCT status FROM rmsg_message")
    assert [r["status"] for r in statuses] == ["done"]


async def test_reprepare_same_body_is_200_and_other_body_is_409(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    assert (await prepare(client, "m-3")).status_code == 201
    again = await prepare(client, "m-3")
    assert again.status_code == 200
    assert again.json()["id"] == "m-3"
    other = await client.post(
        "/v1/messages",
        json={"id": "m-3", "topic": "order.paid", "payload": {"order_id": 43}},
        headers=auth(PRODUCER),
    )
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "id_conflict"
    assert await db.fetchval("SELECT payload->>'order_id' FROM rmsg_message") == "42"


async def test_list_filters_by_status_topic_and_group(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    """Each filter, alone and combined, returns exactly the matching messages, oldest
    first; ``group`` means a delivery to that group (a pending message has none yet)."""
    made = [
        ("l-1", "order.paid", "pending"),
        ("l-2", "order.paid", "sent"),  # to inventory, credit, wms
        ("l-3", "order.created", "sent"),  # to credit only
        ("l-4", "order.created", "pending"),
        ("l-5", "order.paid", "cancelled"),
    ]
    for id, topic, status in made:
        r = await client.post(
            "/v1/messages",
            json={"id": id, "topic": topic, "payload": PAID},
            headers=auth(PRODUCER),
        )
        assert r.status_code == 201, r.text
        if status == "sent":
            assert (await confirm(client, id)).status_code == 200
        elif status == "cancelled":
            r = await client.post(f"/v1/messages/{id}/cancel", headers=auth(PRODUCER))
            assert r.status_code == 200, r.text

    async def listed(**params: str) -> list[str]:
        r = await client.get("/v1/messages", params=params, headers=auth(ADMIN))
        assert r.status_code == 200, r.text
        assert r.json()["next_cursor"] is None
        return [m["id"] for m in r.json()["messages"]]

    assert await listed() == ["l-1", "l-2", "l-3", "l-4", "l-5"]
    assert await listed(status="pending") == ["l-1", "l-4"]
    assert await listed(status="sent") == ["l-2", "l-3"]
    assert await listed(status="cancelled") == ["l-5"]
    assert await listed(status="done") == []
    assert await listed(topic="order.created") == ["l-3", "l-4"]
    assert await listed(topic="order.paid") == ["l-1", "l-2", "l-5"]
    assert await listed(topic="payment.done") == []
    assert await listed(group="inventory") == ["l-2"]
    assert await listed(group="credit") == ["l-2", "l-3"]
    assert await listed(status="pending", topic="order.created") == ["l-4"]
    assert await listed(topic="order.paid", group="credit") == ["l-2"]
    assert await listed(status="pending", group="credit") == []
    # The set-up made what the table above says.
    rows = await db.fetch("SELECT id, topic, status FROM rmsg_message ORDER BY id")
    assert [tuple(r) for r in rows] == made


async def test_cancel_then_confirm_is_409_and_nothing_published(
    client: httpx.AsyncClient,
    settings: Settings,
    amqp: aio_pika.abc.AbstractConnection,
    db: asyncpg.Connection,
) -> None:
    await prepare(client, "m-4")
    r = await client.post("/v1/messages/m-4/cancel", headers=auth(PRODUCER))
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    again = await client.post("/v1/messages/m-4/cancel", headers=auth(PRODUCER))
    assert again.status_code == 200
    r = await confirm(client, "m-4")
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "cancelled"
    assert await status_of(db, "m-4") == "cancelled"
    assert await rabbit.drain(amqp, settings.queue_name("inventory"), wait=0.3) == []


async def test_cancel_after_confirm_is_409(client: httpx.AsyncClient) -> None:
    await prepare(client, "m-5")
    await confirm(client, "m-5")
    r = await client.post("/v1/messages/m-5/cancel", headers=auth(PRODUCER))
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "already_sent"
    assert (await confirm(client, "m-5")).status_code == 200  # confirm is idempotent


async def test_confirm_while_rabbitmq_is_stopped_keeps_message_pending(
    client: httpx.AsyncClient,
    runtime: Runtime,
    settings: Settings,
    amqp: aio_pika.abc.AbstractConnection,
    db: asyncpg.Connection,
) -> None:
    await prepare(client, "m-6")
    with rabbit.stopped():
        r = await confirm(client, "m-6")
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "broker_unavailable"
        assert await status_of(db, "m-6") == "pending"
        assert await db.fetchval("SELECT count(*) FROM rmsg_delivery") == 0
    await wait_until(lambda: runtime.publisher.connected, within=30)
    r = await confirm(client, "m-6")
    assert r.status_code == 200, r.text
    assert await status_of(db, "m-6") == "sent"
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        [message] = await rabbit.drain(connection, settings.queue_name("inventory"), wait=0.3)
    finally:
        await connection.close()
    assert message.message_id == "m-6"


#: The publish timeout of the stalled-broker test: the confirm call answers once it passes.
STALL_TIMEOUT = 0.5
#: Longer than any confirm bounded by that timeout may take: beyond it, the call hangs.
STALL_GUARD = 30.0


async def test_confirm_while_the_broker_stalls_is_503_after_the_publish_timeout(
    make_settings: Callable[..., Settings],
    amqp: aio_pika.abc.AbstractConnection,
    db: asyncpg.Connection,
) -> None:
    """RabbitMQ's connection stays open but nothing comes back (a stalled proxy between
    the service and RabbitMQ): the confirm gives up after ``publish_timeout`` with a 503,
    and the message stays ``pending`` until a confirm after the stall succeeds."""
    async with FaultProxy("127.0.0.1", 5672) as proxy:
        settings = make_settings(
            amqp_url=proxy.url("amqp", "guest:guest", "/"),
            publish_timeout=STALL_TIMEOUT,
            # Every failure here is a 503 of its own; the fallback is another test's.
            fallback={"failure_threshold": 1000},
        )
        runtime = await Runtime.create(settings, scanners=False)
        await runtime.start()
        try:
            assert runtime.publisher.connected
            transport = httpx.ASGITransport(app=create_app(runtime))
            async with httpx.AsyncClient(transport=transport, base_url="http://rmsg") as client:
                assert (await prepare(client, "m-7")).status_code == 201
                proxy.stall()
                async with asyncio.timeout(STALL_GUARD):  # a hang fails, not a slow answer
                    r = await confirm(client, "m-7")
                assert r.status_code == 503, r.text
                assert r.headers["content-type"] == "application/json"
                assert r.headers["retry-after"] == "1"
                body = r.json()
                assert list(body) == ["error"] and sorted(body["error"]) == ["code", "message"]
                assert body["error"]["code"] == "broker_unavailable"
                assert f"no publisher confirm within {STALL_TIMEOUT}s" in body["error"]["message"]
                assert runtime.publisher.connected, "a stall, not a lost connection"
                assert await status_of(db, "m-7") == "pending"
                assert await db.fetchval("SELECT count(*) FROM rmsg_delivery") == 0

                proxy.resume()
                r = await confirm(client, "m-7")
                assert r.status_code == 200, r.text
                assert r.json()["status"] == "sent"
            assert await status_of(db, "m-7") == "sent"
            # The publish the stall held back may reach RabbitMQ too once it ends: at
            # least once, never lost.
            queued = await rabbit.drain(amqp, settings.queue_name("inventory"), wait=0.3)
            assert queued and {m.message_id for m in queued} == {"m-7"}
        finally:
            proxy.resume()
            await runtime.stop()
            await rabbit.delete_topology(AMQP_URL, settings)
            await delete_namespace(settings.redis_url, settings.fallback.namespace)


async def test_unroutable_publish_is_an_error_and_message_stays_pending(
    client: httpx.AsyncClient,
    settings: Settings,
    amqp: aio_pika.abc.AbstractConnection,
    db: asyncpg.Connection,
) -> None:
    # order.created reaches only the credit group; without its queue nothing takes it.
    async with amqp.channel() as channel:
        await channel.queue_delete(settings.queue_name("credit"))
    body = {"id": "lost", "topic": "order.created", "payload": {}}
    assert (await client.post("/v1/messages", json=body, headers=auth(PRODUCER))).is_success
    r = await confirm(client, "lost")
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "unroutable"
    assert await status_of(db, "lost") == "pending"
