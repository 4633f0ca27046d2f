"""Load processes of the benchmark: producers, a consumer and a TCC initiator, each a
process of its own so that the load generator is not what the figures measure.

    python -m reliable_msg.tools.bench.worker produce SPEC_JSON
    python -m reliable_msg.tools.bench.worker consume SPEC_JSON
    python -m reliable_msg.tools.bench.worker initiate SPEC_JSON
    python -m reliable_msg.tools.bench.worker floor-serve SPEC_JSON
    python -m reliable_msg.tools.bench.worker floor-call SPEC_JSON

A producer waits for ``start_at`` (wall clock), produces its share and writes, per
message, the wall times its confirm was sent and answered to ``out``. The consumer
handles messages until SIGTERM, prints a line per 100 handled (progress), and writes, per
message, the wall times it arrived and its handler started to ``out``.

The floor's two processes (see :mod:`.floor`): ``floor-serve`` serves the bare route
until SIGTERM; ``floor-call`` calls it, prints ``warm`` after its warm-up, waits for a
line on stdin, makes its measured calls, prints ``done`` and waits for another line (so
that its CPU time is read while it is still alive) before it exits.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import uvloop

from reliable_msg.sdk.client import RetryPolicy, ServiceClient
from reliable_msg.sdk.consumer import Consumer, Poison, Received, Source
from reliable_msg.sdk.producer import Outgoing, Producer
from reliable_msg.sdk.tcc import Branch, Initiator
from reliable_msg.tools.bench import floor

RETRY = RetryPolicy(attempts=10, initial=0.05, max_wait=1.0, deadline=60.0)


class _TimedClient(ServiceClient):
    #: Per message: when its confirm was sent, and when it was answered.
    sent: dict[str, list[float]]

    async def confirm(self, id: str) -> dict[str, Any]:
        times = self.sent[id] = [time.time()]
        answer = await super().confirm(id)
        times.append(time.time())
        return answer

    async def confirm_many(self, ids: Any) -> Any:
        now = time.time()
        times = [now]
        for id in ids:
            self.sent[id] = times
        answer = await super().confirm_many(ids)
        times.append(time.time())
        return answer


class _TimedConsumer(Consumer):
    #: Per message: when it arrived (from RabbitMQ or Redis), and when its handler started.
    times: dict[str, list[float]]

    async def consume(self, message: Received | Poison, source: Source) -> None:
        if isinstance(message, Received):
            self.times.setdefault(message.id, [time.time()])
        await super().consume(message, source)


async def produce(spec: dict[str, Any]) -> dict[str, list[float]]:
    pool = await asyncpg.create_pool(spec["app_db"], min_size=2, max_size=spec["concurrency"] + 2)
    client = _TimedClient(spec["url"], spec["token"], retry=RETRY)
    client.sent = {}
    producer = Producer(client=client)
    batch, count, rate = spec["batch"], spec["messages"], spec.get("rate")
    batches = [
        [
            Outgoing(spec["topic"], {"n": i, "amount": "19.90"})
            for i in range(start, min(start + batch, count))
        ]
        for start in range(0, count, batch)
    ]
    limit = asyncio.Semaphore(spec["concurrency"])

    async def one(items: list[Outgoing]) -> None:
        async with limit, pool.acquire() as conn:
            async with producer.transaction_many(conn, items):
                await conn.execute(
                    "INSERT INTO bench_orders (id, at) SELECT unnest($1::text[]), now()",
                    [m.id for m in items],
                )

    await asyncio.sleep(max(0.0, spec["start_at"] - time.time()))
    if rate:
        tasks = []
        start = time.time()
        for i, items in enumerate(batches):
            await asyncio.sleep(max(0.0, start + i * len(items) / rate - time.time()))
            tasks.append(asyncio.create_task(one(items)))
        await asyncio.gather(*tasks)
    else:
        await asyncio.gather(*(one(b) for b in batches))
    await producer.close()
    await pool.close()
    return client.sent


async def consume(spec: dict[str, Any]) -> dict[str, list[float]]:
    pool = await asyncpg.create_pool(spec["app_db"], min_size=2, max_size=24)
    consumer = _TimedConsumer(
        spec["group"],
        service_url=spec["url"],
        token=spec["token"],
        amqp_url=spec["amqp_url"],
        pool=pool,
        queue=spec["queue"],
        prefetch=1000,
        concurrency=24,
        ack_batch=500,
        ack_interval=0.02,
        retry=RETRY,
        redis_url=spec["redis_url"],
        namespace=spec["namespace"],
        shards=spec["shards"],
        poll_interval=0.2,
    )
    times = consumer.times = {}
    handled = 0

    @consumer.handler(spec["topic"])
    async def effect(conn: asyncpg.Connection, message: Received) -> None:
        nonlocal handled
        mine = times[message.id]
        mine.append(time.time())
        await conn.execute("INSERT INTO bench_effects (id) VALUES ($1)", message.id)
        if len(mine) == 2:  # not a retry of the handler
            handled += 1
            if handled % 100 == 0:
                print(handled, flush=True)

    await consumer.run()
    await pool.close()
    return {id: t for id, t in times.items() if len(t) > 1}


async def initiate(spec: dict[str, Any]) -> dict[str, list[float]]:
    initiator = Initiator(spec["url"], spec["token"], retry=RETRY)
    times: dict[str, list[float]] = {}
    limit = asyncio.Semaphore(spec["concurrency"])

    async def one(n: int) -> None:
        gid = f"bench-{n}"
        branches = [Branch(p, f"{p}-{n}", {"qty": spec["qty"]}) for p in spec["participants"]]
        async with limit:
            began = time.time()
            async with initiator.transaction(gid, timeout=spec["timeout"]) as tx:
                await tx.try_all(branches)
            times[gid] = [began, time.time()]
        if len(times) % 10 == 0:
            print(len(times), flush=True)

    await asyncio.sleep(max(0.0, spec["start_at"] - time.time()))
    await asyncio.gather(*(one(n) for n in range(spec["transactions"])))
    print(len(times), flush=True)
    await initiator.close()
    return times


async def floor_serve(spec: dict[str, Any]) -> dict[str, list[float]]:
    await floor.serve(spec["port"])
    return {}


async def floor_call(spec: dict[str, Any]) -> dict[str, list[float]]:
    await floor.call(spec["url"], spec["warm_up"], spec["requests"], spec["in_flight"])
    return {}


def main() -> None:
    command, spec = sys.argv[1], json.loads(sys.argv[2])
    work = {
        "produce": produce,
        "consume": consume,
        "initiate": initiate,
        "floor-serve": floor_serve,
        "floor-call": floor_call,
    }[command]
    times = uvloop.run(work(spec))
    if "out" in spec:
        Path(spec["out"]).write_text(json.dumps(times))


if __name__ == "__main__":
    main()
