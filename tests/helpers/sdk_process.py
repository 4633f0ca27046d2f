"""A producer or consumer in a process of its own, for tests that kill it with SIGKILL.

    python -m tests.helpers.sdk_process produce-and-die ID
        prepares ID, commits its local transaction, then dies before the confirm.
    python -m tests.helpers.sdk_process consume GROUP [CRASH_ID]
        consumes GROUP; dies right after handling CRASH_ID, before acking it. With HOLD
        set (a number), each handler, after its effect, waits for the advisory lock
        HOLD before it returns (a test holds that lock to keep the handler running).
        With ACK_INTERVAL set, acks wait that many seconds in the batcher; STOP_TIMEOUT
        bounds the wait for the acks at SIGTERM.

Connection settings come from the environment (see tests/test_sdk.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import asyncpg

from reliable_msg.sdk.consumer import Consumer, Received
from reliable_msg.sdk.producer import Producer


async def produce_and_die(id: str) -> None:
    pool = await asyncpg.create_pool(os.environ["DB"], min_size=1, max_size=2)
    producer = Producer(os.environ["SERVICE"], os.environ["TOKEN"])

    async def die(ids: list[str]) -> bool:
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")

    producer._confirm = die  # type: ignore[method-assign]  # the crash point under test
    async with pool.acquire() as conn:
        async with producer.transaction(conn, "order.paid", {"order": id}, id=id):
            await conn.execute("INSERT INTO sdk_orders (id) VALUES ($1)", id)


class CrashingConsumer(Consumer):
    crash_id: str | None = None

    async def handle(self, received: Received) -> bool:
        fresh = await super().handle(received)
        if received.id == self.crash_id:
            os.kill(os.getpid(), signal.SIGKILL)  # committed, not acked
        return fresh


async def consume(group: str, crash_id: str | None) -> None:
    pool = await asyncpg.create_pool(os.environ["DB"], min_size=1, max_size=4)
    consumer = CrashingConsumer(
        group,
        service_url=os.environ["SERVICE"],
        token=os.environ["TOKEN"],
        amqp_url=os.environ["AMQP"],
        pool=pool,
        queue=os.environ["QUEUE"],
        redis_url=os.environ.get("REDIS"),
        namespace=os.environ.get("NAMESPACE", "rmsg"),
        shards=int(os.environ.get("SHARDS", "128")),
        poll_interval=0.2,
        claim_idle=1.0,
        ack_interval=float(os.environ.get("ACK_INTERVAL", "0.05")),
        stop_timeout=float(os.environ.get("STOP_TIMEOUT", "10")),
    )
    consumer.crash_id = crash_id

    hold = os.environ.get("HOLD")

    @consumer.handler("order.paid")
    async def effect(conn: asyncpg.Connection, message: Received) -> None:
        await conn.execute(
            "INSERT INTO sdk_effects (group_name, message_id) VALUES ($1, $2)", group, message.id
        )
        if hold:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", int(hold))

    await consumer.run()
    await pool.close()


def main() -> None:
    command, *args = sys.argv[1:]
    if command == "produce-and-die":
        asyncio.run(produce_and_die(args[0]))
    elif command == "consume":
        asyncio.run(consume(args[0], args[1] if len(args) > 1 else None))
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main()
