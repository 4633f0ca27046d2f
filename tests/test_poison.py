"""The README's claim on poison deliveries from RabbitMQ (issue 11, item 11): a delivery
with no id, a body that is not JSON or an unknown topic lands in the group's ``.dlq``
queue while the consumer carries on. They are published raw, with aio-pika, to the
group's queue, between good messages sent through the service."""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import asyncpg
from pamqp import commands, frame
from pamqp.body import ContentBody
from pamqp.exceptions import UnmarshalingException
from pamqp.header import ContentHeader, ProtocolHeader

from reliable_msg.sdk import consumer as consumer_sdk
from reliable_msg.sdk import producer as producer_sdk
from reliable_msg.sdk.client import RetryPolicy
from reliable_msg.sdk.consumer import Consumer
from reliable_msg.sdk.producer import Producer
from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from tests.conftest import PRODUCER
from tests.helpers import rabbit, tables
from tests.helpers.consumers import inventory_consumer, running_effects
from tests.helpers.waiting import wait_until

RETRY = RetryPolicy(attempts=5, initial=0.05, max_wait=0.5, deadline=10.0)


async def publish_raw(queue: str, body: bytes, **properties: Any) -> None:
    """Publish one message to ``queue`` with exactly ``properties``, over a bare AMQP
    connection: aio-pika (aiormq) gives every message it publishes an id."""
    reader, writer = await asyncio.open_connection("127.0.0.1", 5672)
    buffer = b""

    async def receive(kind: type[Any]) -> Any:
        nonlocal buffer
        while True:
            try:
                used, _, value = frame.unmarshal(buffer)
            except UnmarshalingException:
                buffer += await asyncio.wait_for(reader.read(65536), 10)
                continue
            buffer = buffer[used:]
            if isinstance(value, kind):
                return value

    def send(channel: int, *values: Any) -> None:
        for value in values:
            writer.write(frame.marshal(value, channel))

    try:
        writer.write(ProtocolHeader().marshal())
        await receive(commands.Connection.Start)
        send(0, commands.Connection.StartOk(response="\0guest\0guest"))
        tune = await receive(commands.Connection.Tune)
        send(0, commands.Connection.TuneOk(tune.channel_max, tune.frame_max, 0))
        send(0, commands.Connection.Open(virtual_host="/"))
        await receive(commands.Connection.OpenOk)
        send(1, commands.Channel.Open())
        await receive(commands.Channel.OpenOk)
        send(
            1,
            commands.Basic.Publish(exchange="", routing_key=queue),
            ContentHeader(0, len(body), commands.Basic.Properties(**properties)),
            ContentBody(body),
        )
        # The broker has taken the message once it answers the close that follows it.
        send(0, commands.Connection.Close(200, "bye", 0, 0))
        await receive(commands.Connection.CloseOk)
    finally:
        writer.close()


async def send(producer: Producer, pool: asyncpg.Pool, id: str) -> None:
    async with pool.acquire() as conn:
        async with producer.transaction(conn, "order.paid", {"id": id}, id=id) as sent:
            pass
    assert sent.confirmed


async def done(db: asyncpg.Connection, ids: list[str]) -> bool:
    n = await db.fetchval(
        "SELECT count(*) FROM rmsg_delivery WHERE group_name = 'inventory' AND status = 'done'"
        " AND message_id = ANY($1::text[])",
        ids,
    )
    return bool(n == len(ids))


async def test_poison_deliveries_go_to_the_dlq_and_the_consumer_carries_on(
    runtime: Runtime,
    service_url: str,
    settings: Settings,
    pool: asyncpg.Pool,
    db: asyncpg.Connection,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    await producer_sdk.install(db)
    await consumer_sdk.install(db)
    await db.execute("CREATE TABLE IF NOT EXISTS sdk_effects (group_name text, message_id text)")
    await tables.empty(db, "sdk_effects", "rmsg_inbox", "rmsg_producer_marker")
    queue = settings.queue_name("inventory")
    poison: list[tuple[bytes, dict[str, str]]] = [
        (b'{"n": 1}', {"message_type": "order.paid"}),  # no id
        (b"{not json", {"message_id": "not-json", "message_type": "order.paid"}),
        (b'{"n": 1}', {"message_id": "unknown-topic", "message_type": "order.refunded"}),
    ]
    consumer = inventory_consumer(service_url, settings, pool, RETRY, Consumer)
    async with Producer(service_url, PRODUCER, retry=RETRY) as producer:
        async with running_effects(consumer):
            await send(producer, pool, "good-before")
            await wait_until(lambda: done(db, ["good-before"]), within=15)
            for body, properties in poison:
                await publish_raw(queue, body, **properties)
            await send(producer, pool, "good-after")
            await wait_until(lambda: done(db, ["good-after"]), within=15)

    dead = await rabbit.drain(amqp, settings.dead_letter_queue("inventory"))
    assert sorted((m.message_id or "", m.type or "", m.body) for m in dead) == sorted(
        (p.get("message_id", ""), p["message_type"], body) for body, p in poison
    )
    assert [m.body for m in dead if m.message_id is None] == [b'{"n": 1}']
    for message in dead:
        headers: Any = message.headers
        [death] = headers["x-death"]
        assert (death["reason"], death["queue"]) == ("rejected", queue)
    effects = await db.fetch("SELECT message_id FROM sdk_effects ORDER BY message_id")
    assert [r["message_id"] for r in effects] == ["good-after", "good-before"]
