"""A consumer of the test's ``inventory`` group, wired to the test settings: in process,
run with the effect the tests count, or the environment of one in a process of its own
(tests/helpers/sdk_process.py)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg

from reliable_msg.sdk.client import RetryPolicy
from reliable_msg.sdk.consumer import Consumer, Received
from reliable_msg.service.settings import Settings
from tests.conftest import AMQP_URL, GROUP_TOKENS

C = TypeVar("C", bound=Consumer)


def inventory_process_env(
    service_url: str, settings: Settings, database_url: str, **extra: str
) -> dict[str, str]:
    """The environment of ``python -m tests.helpers.sdk_process consume inventory``."""
    return {
        **os.environ,
        "DB": database_url,
        "SERVICE": service_url,
        "TOKEN": GROUP_TOKENS["inventory"],
        "AMQP": AMQP_URL,
        "QUEUE": settings.queue_name("inventory"),
        **extra,
    }


def inventory_consumer(
    service_url: str,
    settings: Settings,
    pool: asyncpg.Pool,
    retry: RetryPolicy,
    cls: type[C],
    *,
    amqp_url: str | Sequence[str] = AMQP_URL,
    **options: Any,
) -> C:
    return cls(
        "inventory",
        service_url=service_url,
        token=GROUP_TOKENS["inventory"],
        amqp_url=amqp_url,
        pool=pool,
        queue=settings.queue_name("inventory"),
        retry=retry,
        **options,
    )


def fallback_consumer(
    service_url: str,
    settings: Settings,
    pool: asyncpg.Pool,
    retry: RetryPolicy,
    cls: type[C],
    *,
    shards: int,
    claim_idle: float = 1.0,
) -> C:
    """:func:`inventory_consumer` on the machine's RabbitMQ and the fallback's ``shards``
    in ``settings.redis_url``, polled every 0.2 s, an entry claimed after ``claim_idle``
    seconds idle (the SDK's default is 30)."""
    return inventory_consumer(
        service_url,
        settings,
        pool,
        retry,
        cls,
        redis_url=settings.redis_url,
        namespace=settings.fallback.namespace,
        shards=shards,
        poll_interval=0.2,
        claim_idle=claim_idle,
    )


@asynccontextmanager
async def running_effects(
    consumer: C, *, stop_within: float = 30.0, gate: asyncio.Event | None = None
) -> AsyncIterator[C]:
    """Run ``consumer`` in the test's event loop until the block ends; its handler of
    ``order.paid`` writes one ``sdk_effects`` row a message (a second is a duplicate).

    With ``gate``, the handler waits for the gate to open before it writes: the messages
    the consumer took stay undone until the test sets it (and the block's end does)."""

    @consumer.handler("order.paid")
    async def effect(conn: asyncpg.Connection, message: Received) -> None:
        if gate is not None:
            await gate.wait()
        await conn.execute(
            "INSERT INTO sdk_effects (group_name, message_id) VALUES ('inventory', $1)",
            message.id,
        )

    task = asyncio.create_task(consumer.run(handle_signals=False))
    try:
        yield consumer
    finally:
        if gate is not None:
            gate.set()
        consumer.request_stop()
        await asyncio.wait_for(task, stop_within)
