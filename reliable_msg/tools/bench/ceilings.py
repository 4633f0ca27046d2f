"""The raw ceilings: what PostgreSQL and RabbitMQ alone do on this machine."""

from __future__ import annotations

import asyncio
import time
import uuid

import aio_pika
import asyncpg

from reliable_msg.aio import first_of


async def postgres_ceiling(dsn: str, messages: int, connections: int) -> float:
    """Messages/s for a bare insert + update + update per message, on ``connections``."""
    admin = await asyncpg.connect(dsn)
    await admin.execute(
        "DROP TABLE IF EXISTS bench_ceiling;"
        " CREATE TABLE bench_ceiling (id text PRIMARY KEY, status text, payload jsonb)"
    )
    await admin.close()
    pool = await asyncpg.create_pool(dsn, min_size=connections, max_size=connections)
    ids = [uuid.uuid4().hex for _ in range(messages)]
    queue: asyncio.Queue[str] = asyncio.Queue()
    for id in ids:
        queue.put_nowait(id)

    async def worker() -> None:
        async with pool.acquire() as conn:
            while not queue.empty():
                id = queue.get_nowait()
                await conn.execute(
                    "INSERT INTO bench_ceiling VALUES ($1, 'pending', '{\"n\": 1}')", id
                )
                await conn.execute("UPDATE bench_ceiling SET status = 'sent' WHERE id = $1", id)
                await conn.execute("UPDATE bench_ceiling SET status = 'done' WHERE id = $1", id)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    await pool.close()
    return messages / elapsed


async def rabbit_ceilings(
    url: str, messages: int, in_flight: int, queue_type: str
) -> tuple[float, float]:
    """(publish-with-confirm msgs/s, consume-with-ack msgs/s) on a fresh durable queue."""
    name = f"rmsgbench.ceiling.{uuid.uuid4().hex[:6]}"
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(name, durable=True, arguments={"x-queue-type": queue_type})
        body = b'{"order_id": 1, "amount": "19.90"}'
        limit = asyncio.Semaphore(in_flight)

        async def publish(i: int) -> None:
            async with limit:
                await channel.default_exchange.publish(
                    aio_pika.Message(
                        body, message_id=str(i), delivery_mode=aio_pika.DeliveryMode.PERSISTENT
                    ),
                    name,
                )

        started = time.perf_counter()
        await asyncio.gather(*(publish(i) for i in range(messages)))
        publish_rate = messages / (time.perf_counter() - started)

        consume_channel = await connection.channel()
        await consume_channel.set_qos(prefetch_count=in_flight)
        consume_queue = await consume_channel.get_queue(name)
        done = asyncio.Event()
        seen = 0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal seen
            await message.ack()
            seen += 1
            if seen >= messages:
                done.set()

        started = time.perf_counter()
        await consume_queue.consume(on_message)
        await first_of(done.wait(), asyncio.sleep(120))
        consume_rate = seen / (time.perf_counter() - started)
        await channel.queue_delete(name)
        return publish_rate, consume_rate
    finally:
        await connection.close()
