"""A consumer draining the Redis fallback survives what Redis does to it (issue 11, item 4):
a Redis error while it releases an entry whose handler failed, its stream consumer groups
destroyed (or its streams deleted) mid-drain, and entries no handler can take. Each time
every good message is handled once and the consumer goes back to RabbitMQ once the switch
clears. Faults are real: a proxy in front of Redis taken down, ``XGROUP DESTROY``, ``DEL``,
entries written with ``XADD`` by hand."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client import REGISTRY

from reliable_msg.harness.proxy import FaultProxy
from reliable_msg.policy import shard_of
from reliable_msg.sdk.client import RetryPolicy
from reliable_msg.sdk.consumer import Consumer, Received
from reliable_msg.sdk.producer import Producer
from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from reliable_msg.transports.redis import shard_keys
from reliable_msg.transports.redis_client import RedisClient, redis_client
from reliable_msg.transports.switch import Mode
from tests.conftest import PRODUCER
from tests.helpers.consumers import inventory_consumer
from tests.helpers.redis_cluster import ON_REDIS_AND_CLUSTER
from tests.helpers.waiting import wait_until

SHARDS = 8
RETRY = RetryPolicy(attempts=8, initial=0.05, max_wait=0.5, deadline=20.0)
#: Longer than the Redis client's own retries of a refused connection (10, at most 1 s
#: apart), so that a call made while the proxy is down fails for sure.
REDIS_AWAY = 8.0


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    # The switch stays as the test sets it: no probe runs (no scanners).
    return make_settings(fallback={"shards": SHARDS, "poll_interval": 0.2})


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[RedisClient]:
    client = redis_client(settings.redis_url, decode_responses=True)
    yield client
    await client.aclose()


def drain_consumer(
    service_url: str, settings: Settings, pool: asyncpg.Pool, redis_url: str, **options: Any
) -> Consumer:
    """One worker over all the shards: a worker that dies leaves every shard unread."""
    return inventory_consumer(
        service_url,
        settings,
        pool,
        RETRY,
        Consumer,
        redis_url=redis_url,
        namespace=settings.fallback.namespace,
        shards=SHARDS,
        redis_workers=1,
        poll_interval=0.2,
        claim_idle=1.0,
        **options,
    )


async def effect(conn: asyncpg.Connection, message: Received) -> None:
    await conn.execute(
        "INSERT INTO sdk_effects (group_name, message_id) VALUES ('inventory', $1)", message.id
    )


@asynccontextmanager
async def running(consumer: Consumer) -> AsyncIterator[Consumer]:
    task = asyncio.create_task(consumer.run(handle_signals=False))
    try:
        yield consumer
    finally:
        consumer.request_stop()
        await asyncio.wait_for(task, 30)


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
    assert sorted(effects) == sorted(ids), "a message has no effect, or one it should not"
    assert set(effects.values()) == {1}, "a message was applied twice"


async def depth(redis: RedisClient, settings: Settings) -> int:
    keys = shard_keys(settings.fallback.namespace, "inventory", SHARDS)
    return int(sum([await redis.xlen(key) for key in keys]))


async def empty(redis: RedisClient, settings: Settings) -> bool:
    return await depth(redis, settings) == 0


async def back_on_rabbitmq(
    runtime: Runtime,
    consumer: Consumer,
    producer: Producer,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
    ids: list[str],
) -> None:
    """Clear the switch; the consumer drains and goes back to RabbitMQ, which then
    delivers ``ids``."""
    assert runtime.switch is not None
    assert consumer.mode is Mode.DEGRADED
    await runtime.switch.clear("test: RabbitMQ is back")
    await wait_until(lambda: consumer.mode is Mode.NORMAL, within=15)
    await produce(producer, pool, ids)
    await wait_until(lambda: all_done(sdk_db, ids), within=30)


async def test_a_redis_error_releasing_a_failed_message_does_not_end_the_drain(
    runtime: Runtime,
    service_url: str,
    settings: Settings,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
    redis: RedisClient,
) -> None:
    assert runtime.switch is not None
    await runtime.switch.trip("test: degraded on purpose")
    ids = ["fails-once", *(f"good-{i}" for i in range(20))]
    after = [f"after-{i}" for i in range(3)]
    async with FaultProxy("127.0.0.1", 6379) as proxy:
        consumer = drain_consumer(service_url, settings, pool, proxy.url("redis", path="/0"))
        redis_back = asyncio.Event()

        @consumer.handler("order.paid")
        async def fails_while_redis_is_away(conn: asyncpg.Connection, message: Received) -> None:
            if message.id == "fails-once" and not redis_back.is_set():
                # Redis goes away between the handler's failure and the release of the
                # entry (XACK + XDEL) that follows it.
                await proxy.down()
                raise RuntimeError("handler failed")
            await effect(conn, message)

        async with (
            Producer(service_url, PRODUCER, retry=RETRY) as producer,
            running(consumer),
        ):
            await produce(producer, pool, ids)
            await wait_until(lambda: not proxy.listening, within=30)
            await asyncio.sleep(REDIS_AWAY)
            await proxy.up()
            redis_back.set()
            await wait_until(lambda: all_done(sdk_db, ids), within=30)
            # Entries whose release was lost while Redis was away are reclaimed, found
            # handled (the inbox) and released.
            await wait_until(lambda: empty(redis, settings), within=15)
            await back_on_rabbitmq(runtime, consumer, producer, pool, sdk_db, after)
    await assert_one_effect_each(sdk_db, ids + after)


@ON_REDIS_AND_CLUSTER
async def test_consumer_groups_gone_mid_drain_are_created_again(
    runtime: Runtime,
    service_url: str,
    settings: Settings,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
    redis: RedisClient,
) -> None:
    assert runtime.switch is not None
    await runtime.switch.trip("test: degraded on purpose")
    first = [f"first-{i}" for i in range(16)]
    second = [f"second-{i}" for i in range(32)]
    after = [f"after-{i}" for i in range(3)]
    keys = shard_keys(settings.fallback.namespace, "inventory", SHARDS)
    consumer = drain_consumer(service_url, settings, pool, settings.redis_url)
    consumer.add_handler("order.paid", effect)
    async with (
        Producer(service_url, PRODUCER, retry=RETRY) as producer,
        running(consumer),
    ):
        await produce(producer, pool, first)
        await wait_until(lambda: all_done(sdk_db, first), within=30)
        # Mid-drain, half the shards lose their consumer group, the other half their
        # stream (as after a Redis restart without persistence, or a flush): the
        # service's next XADD makes a stream without a group.
        for key in keys[: SHARDS // 2]:
            assert await redis.xgroup_destroy(key, "rmsg") == 1
        assert await redis.delete(*keys[SHARDS // 2 :]) == SHARDS // 2
        await produce(producer, pool, second)
        assert {shard_of(id, SHARDS) for id in second} == set(range(SHARDS))
        await wait_until(lambda: all_done(sdk_db, second), within=30)
        await wait_until(lambda: empty(redis, settings), within=15)
        await back_on_rabbitmq(runtime, consumer, producer, pool, sdk_db, after)
    await assert_one_effect_each(sdk_db, first + second + after)


def fields(id: str | None, **changes: str | None) -> dict[str, str]:
    """A fallback entry's fields as the service writes them, with ``changes`` (None
    removes a field)."""
    entry = {
        "id": id or "",
        "topic": "order.paid",
        "producer": "order",
        "payload": '{"id": 1}',
        "headers": "{}",
        "key": "",
        "attempt": "1",
        "created_at": "2026-01-01T00:00:00+00:00",
        **changes,
    }
    return {k: v for k, v in entry.items() if v is not None}


@ON_REDIS_AND_CLUSTER
async def test_entries_no_handler_can_take_go_to_the_dead_stream(
    runtime: Runtime,
    service_url: str,
    settings: Settings,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
    redis: RedisClient,
) -> None:
    assert runtime.switch is not None
    await runtime.switch.trip("test: degraded on purpose")
    keys = shard_keys(settings.fallback.namespace, "inventory", SHARDS)
    poison: dict[str, tuple[dict[str, str], str]] = {
        "no-id": (fields(None), "no id"),
        "not-json": (fields("not-json", payload="{not json"), "payload is not JSON"),
        "no-producer": (fields("no-producer", producer=None), "no producer field"),
        "unknown-topic": (
            fields("unknown-topic", topic="order.refunded"),
            "no handler for topic 'order.refunded'",
        ),
    }
    for entry, _ in poison.values():
        await redis.xadd(keys[0], entry)  # type: ignore[arg-type]
    good = [f"good-{i}" for i in range(16)]
    after = [f"after-{i}" for i in range(3)]
    consumer = drain_consumer(service_url, settings, pool, settings.redis_url)
    consumer.add_handler("order.paid", effect)
    async with Producer(service_url, PRODUCER, retry=RETRY) as producer:
        await produce(producer, pool, good)
        async with running(consumer):
            await wait_until(lambda: all_done(sdk_db, good), within=30)
            dead_key = f"{settings.fallback.namespace}:fb:{{inventory:dead}}"
            await wait_until(lambda: _length(redis, dead_key, len(poison)), within=10)
            entries: Any = await redis.xrange(dead_key)
            dead: list[dict[str, str]] = [f for _, f in entries]
            await wait_until(lambda: empty(redis, settings), within=15)
            await back_on_rabbitmq(runtime, consumer, producer, pool, sdk_db, after)
    by_reason = {f["dead_reason"].split(":")[0]: f for f in dead}
    assert sorted(by_reason) == sorted(reason for _, reason in poison.values())
    for entry, reason in poison.values():
        kept = by_reason[reason]
        assert kept["dead_from"] == keys[0]
        assert {k: kept[k] for k in entry} == entry, "the dead stream keeps the entry as written"
    await assert_one_effect_each(sdk_db, good + after)


async def _length(redis: RedisClient, key: str, n: int) -> bool:
    return bool(await redis.xlen(key) >= n)


#: The consumer's bound on its dead stream in the test below.
DEAD_MAXLEN = 50


async def test_the_dead_stream_stays_bounded_and_its_length_is_reported(
    runtime: Runtime,
    service_url: str,
    settings: Settings,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
    redis: RedisClient,
) -> None:
    """Many more entries no handler can take than ``dead_maxlen``: the dead stream keeps
    about the latest ``dead_maxlen`` (trimmed by whole stream nodes, ``MAXLEN ~``), and
    ``/readyz`` and the ``rmsg_fallback_dead_entries`` gauge show its length."""
    assert runtime.switch is not None
    await runtime.switch.trip("test: degraded on purpose")
    keys = shard_keys(settings.fallback.namespace, "inventory", SHARDS)
    poison = 6 * DEAD_MAXLEN
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(poison):
            pipe.xadd(keys[i % SHARDS], fields(f"bad-{i}", payload="{not json"))  # type: ignore[arg-type]
        await pipe.execute()
    node = int(str((await redis.config_get("stream-node-max-entries"))["stream-node-max-entries"]))
    consumer = drain_consumer(
        service_url, settings, pool, settings.redis_url, dead_maxlen=DEAD_MAXLEN
    )
    consumer.add_handler("order.paid", effect)
    async with running(consumer):
        await wait_until(lambda: empty(redis, settings), within=30)
    dead_key = f"{settings.fallback.namespace}:fb:{{inventory:dead}}"
    length = await redis.xlen(dead_key)
    assert 0 < length <= DEAD_MAXLEN + node, f"{poison} buried, {length} kept"
    entries: Any = await redis.xrevrange(dead_key, count=1)
    assert entries[0][1]["id"].startswith("bad-"), "the latest are kept"

    async with httpx.AsyncClient(base_url=service_url) as http:
        report = (await http.get("/readyz")).json()
    assert report["fallback_dead"] == {g: 0 for g in settings.groups} | {"inventory": length}
    assert REGISTRY.get_sample_value("rmsg_fallback_dead_entries", {"group": "inventory"}) == length
