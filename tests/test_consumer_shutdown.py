"""SIGTERM flushes the acks waiting in the consumer's batcher before its RabbitMQ channel
closes (issue 11, item 10): handled messages are acked to the service and to RabbitMQ,
none goes back to the queue. A real consumer process, its acks held back by a long batch
window, so that they are surely waiting when the signal comes.

When the service cannot be reached, that flush gives up after ``stop_timeout`` and the
consumer exits all the same: what it could not ack is delivered again and the inbox
absorbs it."""

from __future__ import annotations

import asyncio
import signal
import sys
import time

import aio_pika
import asyncpg
import pytest

from reliable_msg.harness.proxy import FaultProxy
from reliable_msg.sdk import consumer as consumer_sdk
from reliable_msg.sdk import producer as producer_sdk
from reliable_msg.sdk.client import RetryPolicy
from reliable_msg.sdk.consumer import Consumer
from reliable_msg.sdk.producer import Producer
from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from tests.conftest import PRODUCER
from tests.helpers import tables
from tests.helpers.consumers import inventory_consumer, inventory_process_env, running_effects
from tests.helpers.waiting import wait_until

IDS = [f"term-{i}" for i in range(5)]
FAST = RetryPolicy(attempts=3, initial=0.05, max_wait=0.2, deadline=2.0)
#: Far longer than the test: only the shutdown can flush the acks.
ACK_INTERVAL = 600.0


async def handled(db: asyncpg.Connection) -> bool:
    return bool(await db.fetchval("SELECT count(*) FROM sdk_effects") == len(IDS))


async def prepare(db: asyncpg.Connection) -> None:
    await producer_sdk.install(db)
    await consumer_sdk.install(db)
    await db.execute("CREATE TABLE IF NOT EXISTS sdk_effects (group_name text, message_id text)")
    await tables.empty(db, "sdk_effects", "rmsg_inbox", "rmsg_producer_marker")


async def produce(service_url: str, pool: asyncpg.Pool) -> None:
    async with Producer(service_url, PRODUCER) as producer:
        for id in IDS:
            async with pool.acquire() as conn, producer.transaction(conn, "order.paid", {}, id=id):
                pass


async def test_sigterm_flushes_the_acks_waiting_in_the_batcher(
    runtime: Runtime,
    service_url: str,
    settings: Settings,
    pool: asyncpg.Pool,
    db: asyncpg.Connection,
    database_url: str,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    await prepare(db)
    await produce(service_url, pool)
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


#: The consumer process's bound on its acks at SIGTERM.
STOP_TIMEOUT = 2.0


@pytest.mark.parametrize("waiting", ["in the batcher", "in the batcher's own flush"])
async def test_sigterm_exits_within_stop_timeout_when_the_service_is_unreachable(
    waiting: str,
    runtime: Runtime,
    service_url: str,
    settings: Settings,
    pool: asyncpg.Pool,
    db: asyncpg.Connection,
    database_url: str,
) -> None:
    """The consumer reaches the service through a proxy that is taken down: with a long
    batch window, after the messages are handled (the stop's flush retries); with a short
    one, before (the batcher's own flush retries, and the stop's waits behind it). Either
    way SIGTERM ends the process within ``stop_timeout`` with exit code 0, and after the
    service is back the messages are done with one effect each."""
    await prepare(db)
    port = int(service_url.rsplit(":", 1)[1])
    async with FaultProxy("127.0.0.1", port) as proxy:
        interval = str(ACK_INTERVAL) if waiting == "in the batcher" else "0.05"
        env = inventory_process_env(
            proxy.url("http"),
            settings,
            database_url,
            ACK_INTERVAL=interval,
            STOP_TIMEOUT=str(STOP_TIMEOUT),
        )
        consumer = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.helpers.sdk_process", "consume", "inventory", env=env
        )
        try:
            if waiting != "in the batcher":
                await proxy.down()
            await produce(service_url, pool)
            await wait_until(lambda: handled(db), within=30)
            await proxy.down()
            await asyncio.sleep(1.0)  # the flush is retrying by now
            started = time.monotonic()
            consumer.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(consumer.wait(), STOP_TIMEOUT + 20) == 0
            assert time.monotonic() - started < STOP_TIMEOUT + 5, "the stop waited for the acks"
        finally:
            if consumer.returncode is None:
                consumer.kill()
                await consumer.wait()

    statuses = await db.fetch("SELECT status FROM rmsg_delivery WHERE group_name = 'inventory'")
    assert {r["status"] for r in statuses} == {"sent"}, "the acks reached the service"
    # The service is back (no proxy): the copies RabbitMQ delivers again find their rows.
    async with running_effects(inventory_consumer(service_url, settings, pool, FAST, Consumer)):

        async def all_done() -> bool:
            rows = await db.fetch("SELECT status FROM rmsg_delivery WHERE group_name = 'inventory'")
            return [r["status"] for r in rows] == ["done"] * len(IDS)

        await wait_until(all_done, within=30)
    effects = await db.fetch("SELECT message_id, count(*) AS n FROM sdk_effects GROUP BY 1")
    assert {r["message_id"]: r["n"] for r in effects} == dict.fromkeys(IDS, 1)
