"""SIGTERM flushes the acks waiting in the consumer's batcher before its RabbitMQ channel
closes (issue 11, item 10): handled messages are acked to the service and to RabbitMQ,
none goes back to the queue. A real consumer process, its acks held back by a long batch
window, so that they are surely waiting when the signal comes."""

from __future__ import annotations

import asyncio
import signal
import sys
import time

import aio_pika
import asyncpg

from reliable_msg import consumer as consumer_sdk
from reliable_msg import producer as producer_sdk
from reliable_msg.producer import Producer
from reliable_msg.runtime import Runtime
from reliable_msg.settings import Settings
from tests.conftest import PRODUCER
from tests.helpers.consumers import inventory_process_env
from tests.helpers.waiting import wait_until

IDS = [f"term-{i}" for i in range(5)]
#: Far longer than the test: only the shutdown can flush the acks.
ACK_INTERVAL = 600.0


async def handled(db: asyncpg.Connection) -> bool:
    return bool(await db.fetchval("SELECT count(*) FROM sdk_effects") == len(IDS))


async def test_sigterm_flushes_the_acks_waiting_in_the_batcher(
    runtime: Runtime,
    service_url: str,
    settings: Settings,
    pool: asyncpg.Pool,
    db: asyncpg.Connection,
    database_url: str,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    await producer_sdk.install(db)
    await consumer_sdk.install(db)
    await db.execute(
        """
        CREATE TABLE IF NOT EXISTS sdk_effects (group_name text, message_id text);
        TRUNCATE sdk_effects, rmsg_inbox, rmsg_producer_marker;
        """
    )
    async with Producer(service_url, PRODUCER) as producer:
        for id in IDS:
            async with pool.acquire() as conn, producer.transaction(conn, "order.paid", {}, id=id):
                pass
    env = inventory_process_env(service_url, settings, database_url, ACK_INTERVAL=str(ACK_INTERVAL))
    consumer = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.helpers.sdk_process", "consume", "inventory", env=env
    )
    try:
        await wait_until(lambda: handled(db), within=30)
        await asyncio.sleep(0.5)  # no handler task left in flight: only batched acks
        statuses = await db.fetch("SELECT status FROM rmsg_delivery WHERE group_name = 'inventory'")
        assert {r["status"] for r in statuses} == {"sent"}, "acks were not held back"
        started = time.monotonic()
        consumer.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(consumer.wait(), 30) == 0
        assert time.monotonic() - started < ACK_INTERVAL / 10, "waited for the batch window"
    finally:
        if consumer.returncode is None:
            consumer.kill()
            await consumer.wait()

    rows = await db.fetch(
        "SELECT message_id, status, attempts FROM rmsg_delivery WHERE group_name = 'inventory'"
        " ORDER BY message_id"
    )
    assert [(r["message_id"], r["status"], r["attempts"]) for r in rows] == [
        (id, "done", 1) for id in sorted(IDS)
    ]
    # Acked to RabbitMQ before the channel closed: nothing went back to the queue, so
    # nothing is delivered again.
    channel = await amqp.channel()
    queue = await channel.declare_queue(settings.queue_name("inventory"), passive=True)
    assert queue.declaration_result.message_count == 0, "handled messages were requeued"
    await channel.close()
