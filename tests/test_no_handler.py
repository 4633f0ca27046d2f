"""A message whose topic has no handler in the consumer is dead whichever source brings
it (issue 12): RabbitMQ's copy is rejected to the group's ``.dlq``, the Redis fallback's
copy is moved to the group's dead stream ``rmsg:fb:{<group>:dead}``; the consumer
carries on with the rest. Both are real deliveries by the service: the second with the
degradation switch tripped, so that the service writes to the fallback shards."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import asyncpg

from reliable_msg.sdk.client import RetryPolicy
from reliable_msg.sdk.consumer import Consumer, Received
from reliable_msg.sdk.producer import Producer
from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from reliable_msg.transports.redis_client import redis_client
from reliable_msg.transports.switch import Mode
from tests.conftest import AMQP_URL, GROUP_TOKENS, PRODUCER
from tests.helpers import rabbit
from tests.helpers.waiting import wait_until

RETRY = RetryPolicy(attempts=8, initial=0.05, max_wait=0.5, deadline=20.0)
#: The group subscribes to ``order.*``; its consumer handles ``order.paid`` alone.
GROUP = "credit"
UNHANDLED = "order.refunded"


@asynccontextmanager
async def credit_consumer(
    service_url: str, settings: Settings, pool: asyncpg.Pool
) -> AsyncIterator[Consumer]:
    """A consumer of ``credit`` with a handler of ``order.paid`` only, running until the
    block ends; it follows the switch over the test's Redis namespace."""
    consumer = Consumer(
        GROUP,
        service_url=service_url,
        token=GROUP_TOKENS[GROUP],
        amqp_url=AMQP_URL,
        pool=pool,
        queue=settings.queue_name(GROUP),
        retry=RETRY,
        redis_url=settings.redis_url,
        namespace=settings.fallback.namespace,
        shards=settings.fallback.shards,
        poll_interval=0.2,
        claim_idle=1.0,
    )

    @consumer.handler("order.paid")
    async def effect(conn: asyncpg.Connection, message: Received) -> None:
        await conn.execute(
            "INSERT INTO sdk_effects (group_name, message_id) VALUES ($1, $2)", GROUP, message.id
        )

    task = asyncio.create_task(consumer.run(handle_signals=False))
    try:
        yield consumer
    finally:
        consumer.request_stop()
        await asyncio.wait_for(task, 30)


async def produce(producer: Producer, pool: asyncpg.Pool, topic: str, id: str) -> None:
    async with pool.acquire() as conn:
        async with producer.transaction(conn, topic, {"id": id}, id=id) as sent:
            pass
    assert sent.confirmed, id


async def handled(db: asyncpg.Connection, id: str) -> bool:
    status = await db.fetchval(
        "SELECT status FROM rmsg_delivery WHERE group_name = $1 AND message_id = $2", GROUP, id
    )
    return bool(status == "done")


async def effects(db: asyncpg.Connection) -> list[str]:
    rows = await db.fetch("SELECT message_id FROM sdk_effects ORDER BY message_id")
    return [r["message_id"] for r in rows]


async def test_no_handler_from_rabbitmq_goes_to_the_dlq(
    runtime: Runtime,
    service_url: str,
    settings: Settings,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    async with (
        Producer(service_url, PRODUCER, retry=RETRY) as producer,
        credit_consumer(service_url, settings, pool),
    ):
        await produce(producer, pool, UNHANDLED, "refund-mq")
        await produce(producer, pool, "order.paid", "paid-mq")
        await wait_until(lambda: handled(sdk_db, "paid-mq"), within=15)
    dead = await rabbit.drain(amqp, settings.dead_letter_queue(GROUP))
    assert [(m.message_id, m.type) for m in dead] == [("refund-mq", UNHANDLED)]
    assert await effects(sdk_db) == ["paid-mq"]


async def test_no_handler_from_the_redis_fallback_goes_to_the_dead_stream(
    runtime: Runtime,
    service_url: str,
    settings: Settings,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
) -> None:
    assert runtime.switch is not None
    await runtime.switch.trip("test: degraded on purpose")
    dead_key = f"{settings.fallback.namespace}:fb:{{{GROUP}:dead}}"
    redis = redis_client(settings.redis_url, decode_responses=True)
    try:
        async with (
            Producer(service_url, PRODUCER, retry=RETRY) as producer,
            credit_consumer(service_url, settings, pool) as consumer,
        ):
            await wait_until(lambda: consumer.mode is Mode.DEGRADED, within=15)
            await produce(producer, pool, UNHANDLED, "refund-fb")
            await produce(producer, pool, "order.paid", "paid-fb")
            await wait_until(lambda: handled(sdk_db, "paid-fb"), within=15)

            async def buried() -> bool:
                return bool(await redis.xlen(dead_key))

            await wait_until(buried, within=10)
            entries: Any = await redis.xrange(dead_key)
    finally:
        await redis.aclose()
    [(_, dead)] = entries
    assert (dead["id"], dead["topic"]) == ("refund-fb", UNHANDLED)
    assert dead["dead_reason"] == f"no handler for topic {UNHANDLED!r}"
    assert await effects(sdk_db) == ["paid-fb"]
