"""The SDKs' purges of their own tables keep every row the service may still ask or
redeliver about: producer markers (check-back) and consumer inbox rows (redelivery).
Over a real HTTP server, PostgreSQL and RabbitMQ."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import aio_pika
import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from reliable_msg.errors import ServiceUnavailable
from reliable_msg.harness.ports import free_port
from reliable_msg.harness.proxy import FaultProxy
from reliable_msg.sdk import consumer as consumer_sdk
from reliable_msg.sdk import producer as producer_sdk
from reliable_msg.sdk.client import RetryPolicy, ServiceClient
from reliable_msg.sdk.consumer import Consumer, Received
from reliable_msg.sdk.producer import Outgoing, Producer, check_back_router
from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from tests.conftest import ADMIN, GROUP_TOKENS, PRODUCER, auth
from tests.helpers import rabbit
from tests.helpers.consumers import inventory_consumer, running_effects
from tests.helpers.servers import serving_app
from tests.helpers.waiting import wait_until

FAST = RetryPolicy(attempts=2, initial=0.05, max_wait=0.1, deadline=1.0)
OLD = "8 days"


@pytest.fixture
def check_port() -> int:
    return free_port()


@pytest.fixture
def settings(make_settings: Callable[..., Settings], check_port: int) -> Settings:
    url = f"http://127.0.0.1:{check_port}/rmsg/check-back"
    return make_settings(
        producers={"order": {"check_url": url, "token": PRODUCER}},
        checkback={"max_tries": 1},
        redelivery={"max_attempts": 1},
    )


@pytest.fixture
async def http(service_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=service_url) as c:
        yield c


async def status(db: asyncpg.Connection, id: str) -> str | None:
    found: str | None = await db.fetchval("SELECT status FROM rmsg_message WHERE id = $1", id)
    return found


async def ids(db: asyncpg.Connection, table: str) -> list[str]:
    return [r[0] for r in await db.fetch(f"SELECT message_id FROM {table} ORDER BY 1")]


async def age(db: asyncpg.Connection, table: str, column: str, *keep_young: str) -> None:
    await db.execute(
        f"UPDATE {table} SET {column} = now() - interval '{OLD}'"
        " WHERE message_id <> ALL($1::text[])",
        list(keep_young),
    )


async def done_long_ago(db: asyncpg.Connection, *keep_young: str) -> None:
    """The deliveries done by now were done ``OLD`` ago (but ``keep_young``)."""
    await db.execute(
        f"UPDATE rmsg_delivery SET done_at = now() - interval '{OLD}'"
        " WHERE status = 'done' AND message_id <> ALL($1::text[])",
        list(keep_young),
    )


async def produce(
    producer: Producer, pool: asyncpg.Pool, id: str, *, unreachable: FaultProxy | None = None
) -> producer_sdk.Sent:
    async with pool.acquire() as conn:
        async with producer.transaction_many(conn, [Outgoing("order.paid", {}, id=id)]) as sent:
            if unreachable is not None:
                await unreachable.down()
    if unreachable is not None:
        await unreachable.up()
    return sent


async def test_marker_purge_keeps_what_check_back_may_still_ask(
    runtime: Runtime,
    service_url: str,
    http: httpx.AsyncClient,
    check_port: int,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
) -> None:
    """sent: committed and confirmed; unconfirmed: committed, confirm unreachable;
    dead: committed, unconfirmed, check-back exhausted (no endpoint), so an admin's
    requeue will ask again; fenced: prepared, never committed, rolled back by check-back;
    young: sent, but younger than the purge age."""
    port = int(service_url.rsplit(":", 1)[1])
    async with (
        FaultProxy("127.0.0.1", port) as proxy,
        Producer(proxy.url("http"), PRODUCER, retry=FAST) as producer,
    ):
        assert (await produce(producer, pool, "sent")).confirmed
        assert (await produce(producer, pool, "young")).confirmed
        assert not (await produce(producer, pool, "dead", unreachable=proxy)).confirmed
        await wait_until(lambda: _checked_back(runtime, sdk_db, "dead", "dead"), within=10)
        r = await http.post("/v1/messages", json=_body("fenced"), headers=auth(PRODUCER))
        assert r.status_code == 201, r.text
        app = FastAPI()
        app.include_router(check_back_router(pool, PRODUCER))
        async with serving_app(app, port=check_port):
            await wait_until(
                lambda: _checked_back(runtime, sdk_db, "fenced", "cancelled"), within=10
            )
        assert not (await produce(producer, pool, "unconfirmed", unreachable=proxy)).confirmed
        await age(sdk_db, "rmsg_producer_marker", "created_at", "young")

        await proxy.down()
        with pytest.raises(ServiceUnavailable):
            await producer.purge_markers(pool)
        await proxy.up()
        assert await ids(sdk_db, "rmsg_producer_marker") == [
            "dead", "fenced", "sent", "unconfirmed", "young"
        ]  # fmt: skip

        assert await producer.purge_markers(pool, batch=2) == 3
    assert await ids(sdk_db, "rmsg_producer_marker") == ["dead", "young"]
    assert await status(sdk_db, "unconfirmed") == "sent"  # confirmed by the purge

    # The marker kept is what the requeued message's check-back reads: it is delivered.
    r = await http.post("/v1/messages/dead/requeue", headers=auth(ADMIN))
    assert r.status_code == 200, r.text
    async with serving_app(app, port=check_port):
        await wait_until(lambda: _checked_back(runtime, sdk_db, "dead", "sent"), within=10)


def _body(id: str) -> dict[str, object]:
    return {"id": id, "topic": "order.paid", "payload": {}}


async def _checked_back(runtime: Runtime, db: asyncpg.Connection, id: str, want: str) -> bool:
    await runtime.checkback.run_once()
    return await status(db, id) == want


async def test_inbox_purge_keeps_what_a_redelivery_may_still_bring(
    runtime: Runtime,
    service_url: str,
    http: httpx.AsyncClient,
    settings: Settings,
    amqp: aio_pika.abc.AbstractConnection,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
) -> None:
    """acked: handled and acked long ago; young: the same, recent; dead: handled, never
    acked until the delivery died (an admin's requeue redelivers it); unacked: handled,
    the ack never made (the purge makes it, and keeps the row: a copy may still come);
    unknown: a row whose message the service does not know (purged)."""
    consumer = inventory_consumer(service_url, settings, pool, FAST, Consumer)
    await send(http, "acked", "young")
    async with running_effects(consumer):
        await wait_until(lambda: _deliveries_done(sdk_db, "acked", "young"), within=10)
    await send(http, "dead")
    assert await consumer.handle(Received("dead", "order.paid", {}))
    await wait_until(lambda: _redelivered_to_death(runtime, sdk_db, "dead"), within=10)
    await send(http, "unacked")
    for id in ("unacked", "unknown"):
        assert await consumer.handle(Received(id, "order.paid", {}))
    await age(sdk_db, "rmsg_inbox", "processed_at", "young")
    await done_long_ago(sdk_db, "young")

    async with ServiceClient(service_url, GROUP_TOKENS["inventory"], retry=FAST) as client:
        assert await consumer_sdk.purge_inbox(pool, client, "inventory", batch=2) == 2
    assert await ids(sdk_db, "rmsg_inbox") == ["dead", "unacked", "young"]
    assert await _delivery(sdk_db, "unacked") == "done"

    # The row kept absorbs the requeued redelivery: still one effect.
    await rabbit.drain(amqp, settings.queue_name("inventory"), wait=0.3)
    r = await http.post("/v1/messages/dead/requeue", headers=auth(ADMIN))
    assert r.status_code == 200, r.text
    again = inventory_consumer(service_url, settings, pool, FAST, Consumer)
    async with running_effects(again):
        await wait_until(lambda: _deliveries_done(sdk_db, "dead"), within=10)
    effects = await sdk_db.fetch("SELECT message_id FROM sdk_effects WHERE message_id = 'dead'")
    assert len(effects) == 1


async def test_inbox_purge_keeps_the_row_of_a_requeued_copy_still_in_the_queue(
    runtime: Runtime,
    service_url: str,
    http: httpx.AsyncClient,
    settings: Settings,
    amqp: aio_pika.abc.AbstractConnection,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
) -> None:
    """Handled, its acks lost until the delivery died; an admin requeues it (a copy in
    the queue) and the purge runs before the consumer reads that copy: the purge's own
    ack makes the delivery done, and the row stays, so the copy finds it (one effect).
    The row goes only once the delivery has been done for ``older_than``."""
    queue = settings.queue_name("inventory")
    consumer = inventory_consumer(service_url, settings, pool, FAST, Consumer)
    async with running_effects(consumer):
        pass  # registers the handler only
    await send(http, "requeued")
    assert await consumer.handle(Received("requeued", "order.paid", {}))
    await wait_until(lambda: _redelivered_to_death(runtime, sdk_db, "requeued"), within=10)
    await rabbit.drain(amqp, queue, wait=0.3)
    await age(sdk_db, "rmsg_inbox", "processed_at")
    r = await http.post("/v1/messages/requeued/requeue", headers=auth(ADMIN))
    assert r.status_code == 200, r.text

    async with ServiceClient(service_url, GROUP_TOKENS["inventory"], retry=FAST) as client:
        assert await consumer_sdk.purge_inbox(pool, client, "inventory") == 0
        assert await _delivery(sdk_db, "requeued") == "done"  # by the purge's ack
        assert await ids(sdk_db, "rmsg_inbox") == ["requeued"]

        again = inventory_consumer(service_url, settings, pool, FAST, Consumer)
        async with running_effects(again):
            await wait_until(lambda: _queue_empty(amqp, queue), within=10)
        effects = await sdk_db.fetch("SELECT message_id FROM sdk_effects")
        assert [r["message_id"] for r in effects] == ["requeued"], "the copy was handled again"

        # Done, but not for older_than yet: kept; once it has been, it goes.
        assert await consumer_sdk.purge_inbox(pool, client, "inventory") == 0
        await done_long_ago(sdk_db)
        assert await consumer_sdk.purge_inbox(pool, client, "inventory") == 1
    assert await ids(sdk_db, "rmsg_inbox") == []


async def _queue_empty(amqp: aio_pika.abc.AbstractConnection, queue: str) -> bool:
    channel = await amqp.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count == 0
    finally:
        await channel.close()


async def send(http: httpx.AsyncClient, *ids: str) -> None:
    for id in ids:
        for r in [
            await http.post("/v1/messages", json=_body(id), headers=auth(PRODUCER)),
            await http.post(f"/v1/messages/{id}/confirm", headers=auth(PRODUCER)),
        ]:
            assert r.status_code in (200, 201), r.text


async def _inbox_has(db: asyncpg.Connection, *wanted: str) -> bool:
    return set(wanted) <= set(await ids(db, "rmsg_inbox"))


async def _deliveries_done(db: asyncpg.Connection, *ids: str) -> bool:
    done = await db.fetchval(
        "SELECT count(*) FROM rmsg_delivery WHERE group_name = 'inventory' AND status = 'done'"
        " AND message_id = ANY($1::text[])",
        list(ids),
    )
    return bool(done == len(ids))


async def _delivery(db: asyncpg.Connection, id: str) -> str | None:
    found: str | None = await db.fetchval(
        "SELECT status FROM rmsg_delivery WHERE message_id = $1 AND group_name = 'inventory'", id
    )
    return found


async def _redelivered_to_death(runtime: Runtime, db: asyncpg.Connection, id: str) -> bool:
    await runtime.redelivery.run_once()
    return await _delivery(db, id) == "dead"
