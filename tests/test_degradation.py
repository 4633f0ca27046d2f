"""Degradation to the Redis fallback when RabbitMQ is down, and recovery (DESIGN §6).

RabbitMQ and Redis are stopped for real; the autouse fixture in conftest starts them
again whatever happens.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from reliable_msg import consumer as consumer_sdk
from reliable_msg import producer as producer_sdk
from reliable_msg.api import create_app
from reliable_msg.client import RetryPolicy
from reliable_msg.consumer import Consumer
from reliable_msg.fallback import shard_keys
from reliable_msg.producer import Producer
from reliable_msg.runtime import Runtime
from reliable_msg.settings import Settings
from reliable_msg.switch import Mode
from tests.conftest import AMQP_URL, GROUP_TOKENS, PRODUCER, auth
from tests.helpers import rabbit, redis_ctl
from tests.helpers.consumers import inventory_consumer, running_effects
from tests.helpers.processes import stop_gracefully
from tests.helpers.waiting import wait_until

SHARDS = 8
RETRY = RetryPolicy(attempts=8, initial=0.05, max_wait=0.5, deadline=20.0)


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(
        fallback={"failure_threshold": 3, "shards": SHARDS, "poll_interval": 0.2},
        publish_timeout=1.0,
    )


@pytest.fixture
async def sdk_db(db: asyncpg.Connection) -> asyncpg.Connection:
    await producer_sdk.install(db)
    await consumer_sdk.install(db)
    await db.execute(
        """
        CREATE TABLE IF NOT EXISTS sdk_effects (group_name text, message_id text);
        TRUNCATE sdk_effects, rmsg_inbox, rmsg_producer_marker;
        """
    )
    return db


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(settings.redis_url)
    yield client
    await client.aclose()


class WatchedConsumer(Consumer):
    """Records each mode change with the fallback depth seen at that moment."""

    changes: list[tuple[Mode, int]]
    depth: Callable[[], int]

    def set_mode(self, mode: Mode) -> None:
        if mode is not self.mode:
            self.changes.append((mode, self.depth()))
        super().set_mode(mode)


@asynccontextmanager
async def consuming(
    service_url: str, settings: Settings, pool: asyncpg.Pool, depth: Callable[[], int]
) -> AsyncIterator[WatchedConsumer]:
    consumer = inventory_consumer(
        service_url,
        settings,
        pool,
        RETRY,
        WatchedConsumer,
        redis_url=settings.redis_url,
        namespace=settings.fallback.namespace,
        shards=SHARDS,
        poll_interval=0.2,
        claim_idle=1.0,
    )
    consumer.changes = []
    consumer.depth = depth
    async with running_effects(consumer, stop_within=20):
        yield consumer


async def produce(producer: Producer, pool: asyncpg.Pool, ids: list[str]) -> None:
    for id in ids:
        async with pool.acquire() as conn:
            async with producer.transaction(conn, "order.paid", {"id": id}, id=id) as sent:
                pass
        assert sent.confirmed, id


async def all_done(db: asyncpg.Connection, ids: list[str]) -> bool:
    n = await db.fetchval(
        "SELECT count(*) FROM rmsg_delivery WHERE group_name = 'inventory' AND status = 'done'"
        " AND message_id = ANY($1::text[])",
        ids,
    )
    return bool(n == len(ids))


async def assert_one_effect_each(db: asyncpg.Connection, ids: list[str]) -> None:
    rows = await db.fetch("SELECT message_id, count(*) AS n FROM sdk_effects GROUP BY message_id")
    effects = {r["message_id"]: r["n"] for r in rows}
    assert sorted(effects) == sorted(ids), "a confirmed message has no effect"
    assert set(effects.values()) == {1}, "a message was applied twice"


class DepthProbe:
    """Synchronous view of the fallback depth, refreshed in the background."""

    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self.keys = shard_keys(settings.fallback.namespace, "inventory", SHARDS)
        self.redis = redis
        self.value = 0

    async def refresh(self) -> int:
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in self.keys:
                pipe.xlen(key)
            self.value = int(sum(await pipe.execute()))
        return self.value


@contextmanager
def outage(kind: str) -> Iterator[None]:
    with rabbit.stopped() if kind == "stop_app" else rabbit.killed():
        yield


@pytest.mark.parametrize("kind", ["stop_app", "node_killed"])
async def test_messages_flow_through_redis_during_an_outage_and_back(
    kind: str,
    runtime: Runtime,
    service_url: str,
    settings: Settings,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
    redis: aioredis.Redis,
) -> None:
    depth = DepthProbe(redis, settings)
    before = [f"{kind}-before-{i}" for i in range(5)]
    during = [f"{kind}-during-{i}" for i in range(20)]
    after = [f"{kind}-after-{i}" for i in range(5)]
    async with (
        Producer(service_url, PRODUCER, retry=RETRY) as producer,
        consuming(service_url, settings, pool, lambda: depth.value) as consumer,
    ):
        await produce(producer, pool, before)
        await wait_until(lambda: all_done(sdk_db, before), within=15)

        with outage(kind):
            await wait_until(lambda: not runtime.broker.connected, within=15)
            await produce(producer, pool, during)
            assert runtime.switch is not None and runtime.switch.degraded
            history = await runtime.switch.history()
            assert history[0]["mode"] == "degraded"
            # Delivered end to end through Redis while RabbitMQ is still down.
            await wait_until(lambda: all_done(sdk_db, during), within=30)
            assert consumer.mode is Mode.DEGRADED
            assert not await runtime.broker.probe()

        async def recovered() -> bool:
            await depth.refresh()
            return await runtime.broker.probe() or not runtime.broker.degraded

        await wait_until(recovered, within=60, every=0.3)

        async def back_on_rabbitmq() -> bool:
            await depth.refresh()
            return consumer.mode is Mode.NORMAL

        await wait_until(back_on_rabbitmq, within=30)
        await produce(producer, pool, after)
        await wait_until(lambda: all_done(sdk_db, after), within=30)
        assert await depth.refresh() == 0, "messages after recovery went to Redis"

    # The consumer went to Redis once and came back only with its shards empty.
    assert [mode for mode, _ in consumer.changes] == [Mode.DEGRADED, Mode.NORMAL]
    assert consumer.changes[-1][1] == 0
    await assert_one_effect_each(sdk_db, before + during + after)
    r = await httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(runtime)), base_url="http://rmsg"
    ).get("/v1/stats", headers=auth("admin-token"))
    broker = r.json()["broker"]
    assert broker["mode"] == "normal"
    assert [h["mode"] for h in broker["history"][:2]] == ["normal", "degraded"]


async def test_consumer_killed_while_reading_redis_loses_nothing(
    runtime: Runtime,
    service_url: str,
    settings: Settings,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
    database_url: str,
) -> None:
    assert runtime.switch is not None
    await runtime.switch.trip("test: degraded on purpose")
    ids = [f"k-{i}" for i in range(40)]
    async with Producer(service_url, PRODUCER, retry=RETRY) as producer:
        await produce(producer, pool, ids)
    assert await sdk_db.fetchval("SELECT count(*) FROM sdk_effects") == 0

    env = {
        **os.environ,
        "DB": database_url,
        "SERVICE": service_url,
        "TOKEN": GROUP_TOKENS["inventory"],
        "AMQP": AMQP_URL,
        "QUEUE": settings.queue_name("inventory"),
        "REDIS": settings.redis_url,
        "NAMESPACE": settings.fallback.namespace,
        "SHARDS": str(SHARDS),
    }
    crashing = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.helpers.sdk_process",
        "consume",
        "inventory",
        ids[7],
        env=env,
    )
    try:
        assert await asyncio.wait_for(crashing.wait(), 30) == -signal.SIGKILL
    finally:
        if crashing.returncode is None:
            crashing.kill()
    assert not await all_done(sdk_db, ids)

    restarted = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.helpers.sdk_process", "consume", "inventory", env=env
    )
    try:
        await wait_until(lambda: all_done(sdk_db, ids), within=30)
    finally:
        assert await stop_gracefully(restarted) == 0, "no clean exit on SIGTERM"
    await assert_one_effect_each(sdk_db, ids)


async def test_redis_down_while_rabbitmq_down_gives_503_and_completes_after(
    runtime: Runtime,
    settings: Settings,
    client: httpx.AsyncClient,
    db: asyncpg.Connection,
) -> None:
    body = {"id": "both-down", "topic": "order.paid", "payload": {}}
    assert (await client.post("/v1/messages", json=body, headers=auth(PRODUCER))).is_success
    with rabbit.stopped(), redis_ctl.stopped():
        await wait_until(lambda: not runtime.broker.connected, within=15)
        for _ in range(settings.fallback.failure_threshold + 1):
            r = await client.post("/v1/messages/both-down/confirm", headers=auth(PRODUCER))
            assert r.status_code == 503, r.text
        assert await db.fetchval("SELECT status FROM rmsg_message") == "pending"
        assert await db.fetchval("SELECT count(*) FROM rmsg_delivery") == 0

    async def confirmed() -> bool:
        r = await client.post("/v1/messages/both-down/confirm", headers=auth(PRODUCER))
        return r.status_code == 200

    await wait_until(confirmed, within=60, every=0.5)
    assert await db.fetchval("SELECT status FROM rmsg_message") == "sent"


def test_shards_spread_evenly() -> None:
    import random
    import uuid

    from reliable_msg.policy import shard_of

    rng = random.Random(42)
    counts = [0] * 128
    for _ in range(10_000):
        counts[shard_of(str(uuid.UUID(int=rng.getrandbits(128))), 128)] += 1
    mean = 10_000 / 128
    assert max(counts) <= 3 * mean
    assert min(counts) > 0
    assert shard_of("order-7", 128) == shard_of("order-7", 128)


async def test_racing_trips_flip_once_and_watchers_see_it(redis: aioredis.Redis) -> None:
    from reliable_msg.switch import Switch

    ns = f"race-{os.getpid()}"
    switches = [Switch(redis, who=f"s{i}", namespace=ns, poll_interval=5.0) for i in range(4)]
    watcher = Switch(redis, who="watcher", namespace=ns, poll_interval=60.0)
    watching = asyncio.create_task(watcher.watch())
    try:
        await asyncio.sleep(0.2)
        flips = await asyncio.gather(*(s.trip("race") for s in switches for _ in range(5)))
        assert sum(flips) == 1
        assert all(s.degraded for s in switches)
        # The pub/sub notice arrives long before the 60 s re-read would.
        await wait_until(lambda: watcher.degraded, within=2)
        assert len(await watcher.history()) == 1
        assert await switches[0].clear("over") and not await switches[1].clear("over")
        await wait_until(lambda: not watcher.degraded, within=2)
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        await redis.delete(f"{{{ns}}}:switch", f"{{{ns}}}:switch:history")


async def test_redelivery_while_degraded_goes_to_the_groups_shards_only(
    runtime: Runtime,
    client: httpx.AsyncClient,
    db: asyncpg.Connection,
    redis: aioredis.Redis,
    settings: Settings,
) -> None:
    body = {"id": "again", "topic": "order.paid", "payload": {"n": 1}, "key": "member-9"}
    assert (await client.post("/v1/messages", json=body, headers=auth(PRODUCER))).is_success
    assert (await client.post("/v1/messages/again/confirm", headers=auth(PRODUCER))).is_success
    assert runtime.switch is not None
    await runtime.switch.trip("test: degraded on purpose")
    await db.execute("UPDATE rmsg_delivery SET next_attempt_at = now() WHERE group_name = 'wms'")

    assert await runtime.redelivery.run_once() == 1

    ns = settings.fallback.namespace
    found: dict[tuple[str, str], dict[str, str]] = {}
    for group in ("inventory", "credit", "wms"):
        for key in shard_keys(ns, group, SHARDS):
            entries: Any = await redis.xrange(key)
            for _, fields in entries:
                found[(group, key)] = {k.decode(): v.decode() for k, v in fields.items()}
    [(group, key)] = found
    assert group == "wms"
    assert found[(group, key)]["id"] == "again"
    assert found[(group, key)]["attempt"] == "2"
    from reliable_msg.policy import shard_of

    assert key == shard_keys(ns, "wms", SHARDS)[shard_of("member-9", SHARDS)]
    attempts = await db.fetchval("SELECT attempts FROM rmsg_delivery WHERE group_name = 'wms'")
    assert attempts == 2
