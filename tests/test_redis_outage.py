"""Redis taken away while degraded and brought back (issue 11, item 11), as the README's
*When RabbitMQ is down* says: while RabbitMQ and Redis are both down confirm answers 503
and the message stays ``pending``; the entries a Redis without persistence loses are
redelivered from PostgreSQL; once Redis is back (RabbitMQ still down) every message is
delivered through it, each with one effect, to a consumer that ran all along (its stream
consumer groups went with Redis). RabbitMQ and Redis are stopped for real: run
under the exclusive services lock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import asyncpg
import httpx
from fastapi import FastAPI

from reliable_msg.sdk import consumer as consumer_sdk
from reliable_msg.sdk import producer as producer_sdk
from reliable_msg.sdk.client import RetryPolicy
from reliable_msg.sdk.consumer import Consumer
from reliable_msg.sdk.producer import Producer
from reliable_msg.service.api import create_app
from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from reliable_msg.transports.redis import delete_namespace, shard_keys
from reliable_msg.transports.redis_client import redis_client
from reliable_msg.transports.switch import Mode
from tests.conftest import AMQP_URL, OTHER_PRODUCER, PRODUCER, auth
from tests.helpers import rabbit, redis_ctl, tables
from tests.helpers.consumers import fallback_consumer, running_effects
from tests.helpers.servers import serving_app
from tests.helpers.waiting import wait_until

SHARDS = 8
RETRY = RetryPolicy(attempts=10, initial=0.1, max_wait=0.5, deadline=30.0)


@asynccontextmanager
async def checked_back() -> AsyncIterator[str]:
    """A producer's check-back endpoint that answers committed."""
    check = FastAPI()

    @check.post("/check")
    async def committed() -> dict[str, str]:
        return {"status": "committed"}

    async with serving_app(check) as url:
        yield f"{url}/check"


async def done(db: asyncpg.Connection, ids: list[str]) -> bool:
    n = await db.fetchval(
        "SELECT count(*) FROM rmsg_delivery WHERE group_name = 'inventory' AND status = 'done'"
        " AND message_id = ANY($1::text[])",
        ids,
    )
    return bool(n == len(ids))


async def depth(settings: Settings) -> int:
    async with redis_client(settings.redis_url) as redis:
        keys = shard_keys(settings.fallback.namespace, "inventory", SHARDS)
        return int(sum([await redis.xlen(key) for key in keys]))


async def confirm_refused(
    api: httpx.AsyncClient, settings: Settings, db: asyncpg.Connection
) -> None:
    body = {"id": "both-down", "topic": "order.paid", "payload": {}}
    r = await api.post("/v1/messages", json=body, headers=auth(PRODUCER))
    assert r.status_code == 201, r.text
    for _ in range(settings.fallback.failure_threshold + 1):
        r = await api.post("/v1/messages/both-down/confirm", headers=auth(PRODUCER))
        assert r.status_code == 503, r.text
        # RabbitMQ's outage is why it is not published; Redis only failed to stand in.
        assert r.json()["error"]["code"] == "broker_unavailable", r.text
    status = await db.fetchval("SELECT status FROM rmsg_message WHERE id = 'both-down'")
    assert status == "pending"


async def test_redis_away_while_degraded_and_back_loses_nothing(
    make_settings: Callable[..., Settings], pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    await producer_sdk.install(db)
    await consumer_sdk.install(db)
    await db.execute("CREATE TABLE IF NOT EXISTS sdk_effects (group_name text, message_id text)")
    await tables.empty(db, "sdk_effects", "rmsg_inbox", "rmsg_producer_marker")
    in_redis = [f"in-redis-{i}" for i in range(10)]
    async with checked_back() as check_url:
        settings = make_settings(
            fallback={"failure_threshold": 3, "shards": SHARDS, "poll_interval": 0.2},
            publish_timeout=1.0,
            producers={
                "order": {"check_url": check_url, "token": PRODUCER},
                "other": {"check_url": check_url, "token": OTHER_PRODUCER},
            },
            redelivery={
                "ack_timeout": 2.0,
                "backoff_cap": 1.0,
                "max_attempts": 50,
                "retry_after_failure": 0.5,
            },
        )
        rt = await Runtime.create(settings, scanners=True)
        await rt.start()
        gate = asyncio.Event()

        try:
            async with (
                serving_app(create_app(rt)) as service_url,
                httpx.AsyncClient(base_url=service_url) as api,
                Producer(service_url, PRODUCER, retry=RETRY) as producer,
            ):
                consumer = fallback_consumer(
                    service_url, settings, pool, RETRY, Consumer, shards=SHARDS
                )
                async with running_effects(consumer, gate=gate):
                    with rabbit.stopped():
                        await wait_until(lambda: not rt.publisher.connected, within=15)
                        for id in in_redis:
                            async with pool.acquire() as conn:
                                async with producer.transaction(
                                    conn, "order.paid", {}, id=id
                                ) as sent:
                                    pass
                            assert sent.confirmed, id
                        assert rt.switch is not None and rt.switch.degraded
                        await wait_until(lambda: consumer.mode is Mode.DEGRADED, within=15)

                        # Redis goes too, and with it (no persistence) the entries, the
                        # consumer groups and the switch: both down, confirm answers 503
                        # and the message waits.
                        with redis_ctl.stopped():
                            await confirm_refused(api, settings, db)
                        assert await depth(settings) == 0, "Redis kept its entries"

                        # Redis is back, empty; RabbitMQ is still down. Whatever the
                        # consumer had not handled is redelivered, the pending message
                        # is checked back and confirmed, all through Redis once the
                        # switch is tripped again.
                        gate.set()
                        await wait_until(lambda: done(db, [*in_redis, "both-down"]), within=90)
                        assert consumer.mode is Mode.DEGRADED
                        assert rt.switch.degraded
            effects = await db.fetch(
                "SELECT message_id, count(*) AS n FROM sdk_effects GROUP BY message_id"
            )
            assert sorted((r["message_id"], r["n"]) for r in effects) == sorted(
                (id, 1) for id in [*in_redis, "both-down"]
            )
        finally:
            await rt.stop()
            await rabbit.delete_topology(AMQP_URL, settings)
            await delete_namespace(settings.redis_url, settings.fallback.namespace)
