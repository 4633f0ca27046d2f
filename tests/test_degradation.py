"""Degradation to the Redis fallback when RabbitMQ is down, and recovery (README: When
RabbitMQ is down).

RabbitMQ and Redis are stopped for real; the autouse fixture in conftest starts them
again whatever happens.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from reliable_msg.harness.process import stop_gracefully
from reliable_msg.harness.proxy import FaultProxy
from reliable_msg.sdk import consumer as consumer_sdk
from reliable_msg.sdk.client import RetryPolicy
from reliable_msg.sdk.consumer import Consumer
from reliable_msg.sdk.producer import Producer
from reliable_msg.service.api import create_app
from reliable_msg.service.runtime import Runtime, instance_name
from reliable_msg.service.scanners import Scanners
from reliable_msg.service.settings import Settings
from reliable_msg.transports.redis import delete_namespace, shard_keys
from reliable_msg.transports.redis_client import RedisClient, redis_client
from reliable_msg.transports.switch import Mode
from tests.conftest import AMQP_URL, GROUP_TOKENS, OTHER_PRODUCER, PRODUCER, auth
from tests.helpers import rabbit, redis_ctl
from tests.helpers.consumers import (
    fallback_consumer,
    inventory_process_env,
    running_effects,
)
from tests.helpers.redis_cluster import CLUSTER, ON_REDIS_AND_CLUSTER, PLAIN, sync_redis
from tests.helpers.servers import serving_app
from tests.helpers.waiting import wait_until

SHARDS = 8
RETRY = RetryPolicy(attempts=8, initial=0.05, max_wait=0.5, deadline=20.0)


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(
        fallback={"failure_threshold": 3, "shards": SHARDS, "poll_interval": 0.2},
        publish_timeout=1.0,
        # Scanners that run here redeliver unhurried: a slow outage kills nothing.
        redelivery={"ack_timeout": 5.0, "max_attempts": 10},
    )


@pytest.fixture
async def scheduled(runtime: Runtime) -> AsyncIterator[Runtime]:
    """The runtime with the jobs a ``serve`` process runs, the recovery probe among them."""
    scanners = Scanners(
        runtime.settings,
        runtime.checkback,
        runtime.redelivery,
        runtime.purger,
        runtime.degradation.probe,
        runtime.degradation.periodic_report,
        runtime.tcc_driver,
    )
    scanners.start()
    yield runtime
    await scanners.stop()


@asynccontextmanager
async def own_runtime(settings: Settings, *, scanners: bool) -> AsyncIterator[Runtime]:
    """A started service instance on ``settings``, its traces removed afterwards."""
    rt = await Runtime.create(settings, scanners=scanners)
    try:
        await rt.start()
        yield rt
    finally:
        await rt.stop()
        await rabbit.delete_topology(AMQP_URL, settings)
        await delete_namespace(settings.redis_url, settings.fallback.namespace)


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[RedisClient]:
    client = redis_client(settings.redis_url)
    yield client
    await client.aclose()


def depth_now(settings: Settings) -> int:
    """Entries in the ``inventory`` shards, read from Redis this instant (blocking)."""
    client = sync_redis(settings.redis_url)
    try:
        with client.pipeline(transaction=False) as pipe:
            for key in shard_keys(settings.fallback.namespace, "inventory", SHARDS):
                pipe.xlen(key)
            return int(sum(pipe.execute()))
    finally:
        client.close()


class WatchedConsumer(Consumer):
    """Records each mode change with the fallback depth in Redis at that moment."""

    changes: list[tuple[Mode, int]]
    settings: Settings

    def set_mode(self, mode: Mode) -> None:
        if mode is not self.mode:
            self.changes.append((mode, depth_now(self.settings)))
        super().set_mode(mode)


def watched_consumer(service_url: str, settings: Settings, pool: asyncpg.Pool) -> WatchedConsumer:
    consumer = fallback_consumer(service_url, settings, pool, RETRY, WatchedConsumer, shards=SHARDS)
    consumer.changes = []
    consumer.settings = settings
    return consumer


@asynccontextmanager
async def consuming(
    service_url: str, settings: Settings, pool: asyncpg.Pool
) -> AsyncIterator[WatchedConsumer]:
    consumer = watched_consumer(service_url, settings, pool)
    async with running_effects(consumer, stop_within=20):
        yield consumer


async def produce(
    producer: Producer, pool: asyncpg.Pool, ids: list[str], *, key: str | None = None
) -> None:
    for id in ids:
        async with pool.acquire() as conn:
            async with producer.transaction(conn, "order.paid", {"id": id}, id=id, key=key) as sent:
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

    def __init__(self, redis: RedisClient, settings: Settings) -> None:
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


# On the cluster too, RabbitMQ stopped the first way only: how it went makes no
# difference to Redis.
@pytest.mark.parametrize(
    "kind, redis_url",
    [("stop_app", PLAIN), ("node_killed", PLAIN), ("stop_app", CLUSTER)],
    indirect=["redis_url"],
)
async def test_messages_flow_through_redis_during_an_outage_and_back(
    kind: str,
    scheduled: Runtime,
    service_url: str,
    settings: Settings,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
    redis: RedisClient,
) -> None:
    runtime = scheduled
    depth = DepthProbe(redis, settings)
    before = [f"{kind}-before-{i}" for i in range(5)]
    during = [f"{kind}-during-{i}" for i in range(20)]
    after = [f"{kind}-after-{i}" for i in range(5)]
    async with (
        Producer(service_url, PRODUCER, retry=RETRY) as producer,
        consuming(service_url, settings, pool) as consumer,
    ):
        await produce(producer, pool, before)
        await wait_until(lambda: all_done(sdk_db, before), within=15)

        with outage(kind):
            await wait_until(lambda: not runtime.publisher.connected, within=15)
            await produce(producer, pool, during)
            assert runtime.switch is not None and runtime.switch.degraded
            history = await runtime.switch.history()
            assert history[0]["mode"] == "degraded"
            # Delivered end to end through Redis while RabbitMQ is still down.
            await wait_until(lambda: all_done(sdk_db, during), within=30)
            assert consumer.mode is Mode.DEGRADED
            assert runtime.switch.degraded, "the switch cleared while RabbitMQ was down"

        # The service's own probe job clears the switch: nobody calls probe() here.
        await wait_until(lambda: not runtime.publisher.degraded, within=90, every=0.2)
        await wait_until(lambda: consumer.mode is Mode.NORMAL, within=30)
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
    cleared, tripped = broker["history"][:2]
    assert [cleared["mode"], tripped["mode"]] == ["normal", "degraded"]
    assert cleared["by"] == instance_name()
    assert cleared["reason"] == "probe publish confirmed by RabbitMQ"


@ON_REDIS_AND_CLUSTER
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

    env = inventory_process_env(
        service_url,
        settings,
        database_url,
        REDIS=settings.redis_url,
        NAMESPACE=settings.fallback.namespace,
        SHARDS=str(SHARDS),
    )
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
        assert await stop_gracefully(restarted, grace=20.0) == [0], "no clean exit on SIGTERM"
    await assert_one_effect_each(sdk_db, ids)


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


@ON_REDIS_AND_CLUSTER
async def test_racing_trips_flip_once_and_watchers_see_it(redis: RedisClient) -> None:
    from reliable_msg.transports.switch import Switch

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


async def test_a_failing_switch_listener_neither_stops_the_flip_nor_passes_for_redis(
    redis: RedisClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A listener's bug is logged; the trip still happens and answers True (before: the
    listener's error came out of ``trip``, and the publisher, which stays normal when
    Redis fails, took it for a Redis failure or let it out of a confirm)."""
    from reliable_msg.transports.switch import Switch, SwitchState

    ns = f"listener-{os.getpid()}"
    switch = Switch(redis, who="s", namespace=ns, poll_interval=60.0)
    seen: list[SwitchState] = []

    def broken(state: SwitchState) -> None:
        raise ValueError("a listener's bug")

    switch.on_change(broken)
    switch.on_change(seen.append)
    try:
        with caplog.at_level(logging.ERROR, logger="reliable_msg.transports.switch"):
            assert await switch.trip("test") is True
        assert switch.degraded and [s.mode.value for s in seen] == ["degraded"]
        assert any("listener of the switch failed" in r.getMessage() for r in caplog.records)
    finally:
        await redis.delete(f"{{{ns}}}:switch", f"{{{ns}}}:switch:history")


@ON_REDIS_AND_CLUSTER
async def test_redelivery_while_degraded_goes_to_the_groups_shards_only(
    runtime: Runtime,
    client: httpx.AsyncClient,
    db: asyncpg.Connection,
    redis: RedisClient,
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


@ON_REDIS_AND_CLUSTER
async def test_consumers_drain_their_shards_before_going_back_to_rabbitmq(
    runtime: Runtime,
    service_url: str,
    settings: Settings,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="reliable_msg.transports.switch")
    assert runtime.switch is not None
    gate = asyncio.Event()
    held = 0
    consumer = watched_consumer(service_url, settings, pool)

    @consumer.handler("order.paid")
    async def effect(conn: asyncpg.Connection, message: consumer_sdk.Received) -> None:
        nonlocal held
        held += 1
        await gate.wait()
        await conn.execute(
            "INSERT INTO sdk_effects (group_name, message_id) VALUES ('inventory', $1)",
            message.id,
        )

    # One key: all in one shard, more than a worker reads at once.
    ids = [f"held-{i}" for i in range(60)]
    after = [f"held-after-{i}" for i in range(5)]
    await runtime.switch.trip("test: degraded on purpose")
    task = asyncio.create_task(consumer.run(handle_signals=False))
    try:
        await wait_until(lambda: consumer.mode is Mode.DEGRADED, within=15)
        async with Producer(service_url, PRODUCER, retry=RETRY) as producer:
            await produce(producer, pool, ids, key="one-member")
            await wait_until(lambda: held > 0, within=15)
            assert await runtime.switch.clear("test: RabbitMQ is back")

            def consumer_sees_normal() -> bool:
                return any(
                    r.getMessage().startswith("consumer inventory")
                    and r.getMessage().endswith("sees the switch normal")
                    for r in caplog.records
                )

            await wait_until(consumer_sees_normal, within=15)
            # The switch is off, but the shards are not empty: still on Redis.
            assert depth_now(settings) == len(ids)
            assert consumer.mode is Mode.DEGRADED
            gate.set()
            await wait_until(lambda: all_done(sdk_db, ids), within=60)
            await wait_until(lambda: consumer.mode is Mode.NORMAL, within=15)
            await produce(producer, pool, after)
            await wait_until(lambda: all_done(sdk_db, after), within=30)
    finally:
        gate.set()
        consumer.request_stop()
        await asyncio.wait_for(task, 20)
    # Back to RabbitMQ once, and only when the last entry had left the shards.
    assert consumer.changes == [(Mode.DEGRADED, 0), (Mode.NORMAL, 0)]
    assert depth_now(settings) == 0
    await assert_one_effect_each(sdk_db, ids + after)


@ON_REDIS_AND_CLUSTER
async def test_switch_on_while_rabbitmq_still_works_both_sources_are_consumed(
    runtime: Runtime,
    service_url: str,
    settings: Settings,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
) -> None:
    assert runtime.switch is not None
    async with Producer(service_url, PRODUCER, retry=RETRY) as producer:
        await produce(producer, pool, ["in-rabbitmq"])
        await runtime.switch.trip("test: degraded on purpose")
        await produce(producer, pool, ["in-redis"])
    assert depth_now(settings) == 1
    async with consuming(service_url, settings, pool) as consumer:
        await wait_until(lambda: all_done(sdk_db, ["in-rabbitmq", "in-redis"]), within=30)
        assert consumer.mode is Mode.DEGRADED
    assert depth_now(settings) == 0
    await assert_one_effect_each(sdk_db, ["in-rabbitmq", "in-redis"])


async def test_redis_down_while_rabbitmq_down_gives_503_and_completes_after(
    make_settings: Callable[..., Settings],
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
) -> None:
    check = FastAPI()

    @check.post("/check")
    async def committed() -> dict[str, str]:
        return {"status": "committed"}

    async with serving_app(check) as check_url:
        settings = make_settings(
            fallback={"failure_threshold": 3, "shards": SHARDS, "poll_interval": 0.2},
            publish_timeout=1.0,
            producers={
                "order": {"check_url": f"{check_url}/check", "token": PRODUCER},
                "other": {"check_url": f"{check_url}/check", "token": OTHER_PRODUCER},
            },
            redelivery={"ack_timeout": 5.0, "max_attempts": 10},
            # The check-back that finds the producer committed while RabbitMQ and Redis
            # are both down cannot publish; the message is asked again when its lease
            # ends: 3 s here (above the 1 s call timeout), not the default 60 s.
            checkback={"lease": 3.0},
        )
        async with (
            own_runtime(settings, scanners=True) as rt,
            serving_app(create_app(rt)) as service_url,
            httpx.AsyncClient(base_url=service_url) as client,
        ):
            body = {"id": "both-down", "topic": "order.paid", "payload": {}}
            r = await client.post("/v1/messages", json=body, headers=auth(PRODUCER))
            assert r.is_success, r.text
            with rabbit.stopped(), redis_ctl.stopped():
                await wait_until(lambda: not rt.publisher.connected, within=15)
                for _ in range(settings.fallback.failure_threshold + 1):
                    r = await client.post("/v1/messages/both-down/confirm", headers=auth(PRODUCER))
                    assert r.status_code == 503, r.text
                assert await sdk_db.fetchval("SELECT status FROM rmsg_message") == "pending"
                assert await sdk_db.fetchval("SELECT count(*) FROM rmsg_delivery") == 0

            # Nobody confirms again: the check-back scanner finds the producer committed.
            async with consuming(service_url, settings, pool):
                await wait_until(lambda: all_done(sdk_db, ["both-down"]), within=90)
            # The other groups have no consumer here: they ack through the API.
            for group in ("credit", "wms"):
                r = await client.post(
                    "/v1/messages/both-down/ack", headers=auth(GROUP_TOKENS[group])
                )
                assert r.is_success, r.text
            assert await sdk_db.fetchval("SELECT status FROM rmsg_message") == "done"
    await assert_one_effect_each(sdk_db, ["both-down"])


async def test_stalled_publishes_time_out_and_trip_the_switch_at_the_threshold(
    make_settings: Callable[..., Settings], db: asyncpg.Connection
) -> None:
    async with FaultProxy("127.0.0.1", 5672) as proxy:
        settings = make_settings(
            amqp_url=proxy.url("amqp", "guest:guest", "/"),
            fallback={"failure_threshold": 3, "shards": SHARDS, "poll_interval": 0.2},
            publish_timeout=1.0,
        )
        async with (
            own_runtime(settings, scanners=False) as rt,
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=create_app(rt)), base_url="http://rmsg"
            ) as client,
        ):
            await wait_until(lambda: rt.publisher.connected, within=15)
            assert rt.switch is not None
            statuses = []
            proxy.stall()
            try:
                for i in range(settings.fallback.failure_threshold):
                    body = {"id": f"stalled-{i}", "topic": "order.paid", "payload": {}}
                    r = await client.post("/v1/messages", json=body, headers=auth(PRODUCER))
                    assert r.is_success, r.text
                    if i == settings.fallback.failure_threshold - 1:
                        # threshold - 1 timeouts so far: still normal.
                        assert not rt.switch.degraded and rt.publisher.failures == i
                    r = await client.post(
                        f"/v1/messages/stalled-{i}/confirm", headers=auth(PRODUCER)
                    )
                    statuses.append(r.status_code)
            finally:
                proxy.resume()
            # The N-th timeout trips the switch; that message goes to Redis at once.
            assert statuses == [503, 503, 200]
            assert rt.switch.degraded
            [tripped] = await rt.switch.history()
            assert "no publisher confirm within 1.0s" in tripped["reason"]
            depths = (await rt.broker_report())["fallback_depth"]
            assert depths == {"inventory": 1, "credit": 1, "wms": 1}


async def scrape(client: httpx.AsyncClient, name: str, **labels: str) -> float:
    """One sample of the service's ``/metrics`` (0 when absent)."""
    r = await client.get("/metrics")
    assert r.status_code == 200
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


async def test_readyz_metrics_and_the_report_log_show_the_degraded_mode(
    runtime: Runtime, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    assert runtime.switch is not None
    r = await client.get("/readyz")
    assert r.status_code == 200
    assert r.json()["fallback_depth"] == {"inventory": 0, "credit": 0, "wms": 0}
    changes = await scrape(client, "rmsg_mode_changes_total", mode="degraded")

    assert await runtime.switch.trip("test: degraded on purpose")
    body = {"id": "deep", "topic": "order.paid", "payload": {}, "key": "k"}
    assert (await client.post("/v1/messages", json=body, headers=auth(PRODUCER))).is_success
    assert (await client.post("/v1/messages/deep/confirm", headers=auth(PRODUCER))).is_success

    r = await client.get("/readyz")
    assert r.status_code == 200, r.text
    ready = r.json()
    assert ready["status"] == "ready" and ready["mode"] == "degraded"
    assert ready["fallback_depth"] == {"inventory": 1, "credit": 1, "wms": 1}
    [tripped] = ready["history"]
    assert tripped["mode"] == "degraded" and tripped["by"] == instance_name()
    assert tripped["reason"] == "test: degraded on purpose"

    assert await scrape(client, "rmsg_degraded") == 1
    assert await scrape(client, "rmsg_mode_changes_total", mode="degraded") == changes + 1
    assert await scrape(client, "rmsg_fallback_depth", group="inventory") == 1

    with caplog.at_level(logging.INFO, logger="reliable_msg.transports.degradation"):
        await runtime.degradation.periodic_report()
    [line] = [r for r in caplog.records if "fallback depth" in r.getMessage()]
    assert line.levelno == logging.WARNING
    assert line.getMessage() == (
        "mode degraded; fallback depth per group: inventory=1, credit=1, wms=1"
    )

    assert await runtime.switch.clear("test: over")
    assert await scrape(client, "rmsg_degraded") == 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="reliable_msg.transports.degradation"):
        await runtime.degradation.periodic_report()
    [line] = [r for r in caplog.records if "fallback depth" in r.getMessage()]
    assert line.levelno == logging.INFO and "mode normal" in line.getMessage()


@ON_REDIS_AND_CLUSTER
async def test_a_missed_notice_is_caught_by_the_periodic_re_read(
    runtime: Runtime,
    service_url: str,
    settings: Settings,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
    redis: RedisClient,
) -> None:
    switch = runtime.switch
    assert switch is not None
    key = f"{{{settings.fallback.namespace}}}:switch"
    async with consuming(service_url, settings, pool) as consumer:
        await wait_until(lambda: consumer.mode is Mode.NORMAL, within=5)
        # Changed behind everyone's back: no notice is published.
        await redis.hset(key, mapping={"mode": "degraded", "by": "an operator"})
        await wait_until(lambda: switch.degraded, within=10)
        await wait_until(lambda: consumer.mode is Mode.DEGRADED, within=10)
        assert switch.state.by == "an operator"
        await redis.hset(key, mapping={"mode": "normal", "by": "an operator"})
        await wait_until(lambda: not switch.degraded, within=10)
        await wait_until(lambda: consumer.mode is Mode.NORMAL, within=10)
    assert [mode for mode, _ in consumer.changes] == [Mode.DEGRADED, Mode.NORMAL]


async def test_a_shard_over_the_alarm_logs_the_message_and_counts(
    make_settings: Callable[..., Settings],
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = make_settings(fallback={"shards": SHARDS, "shard_alarm": 1})
    async with (
        own_runtime(settings, scanners=False) as rt,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(rt)), base_url="http://rmsg"
        ) as client,
    ):
        assert rt.switch is not None
        await rt.switch.trip("test: degraded on purpose")
        alarms = await scrape(client, "rmsg_fallback_shard_alarms_total", group="inventory")
        with caplog.at_level(logging.WARNING, logger="reliable_msg.transports.redis"):
            for id in ("alarm-1", "alarm-2"):  # one key: the same shard
                body: dict[str, Any] = {"id": id, "topic": "order.paid", "payload": {}, "key": "k"}
                r = await client.post("/v1/messages", json=body, headers=auth(PRODUCER))
                assert r.is_success, r.text
                r = await client.post(f"/v1/messages/{id}/confirm", headers=auth(PRODUCER))
                assert r.is_success, r.text
        after = await scrape(client, "rmsg_fallback_shard_alarms_total", group="inventory")
    assert after == alarms + 1
    warned = [r for r in caplog.records if "alarm at 1" in r.getMessage()]
    # One per group the message goes to, each naming the second message only.
    assert len(warned) == 3
    assert {getattr(r, "message_id", None) for r in warned} == {"alarm-2"}
    assert all(r.levelno == logging.WARNING for r in warned)
    assert any(":fb:{inventory:" in r.getMessage() for r in warned)


async def test_a_group_with_its_own_shard_count_is_written_and_drained_in_full(
    make_settings: Callable[..., Settings],
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
    redis: RedisClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    own = 12  # more than the SHARDS the test consumer is told
    inventory = {"topics": ["order.paid"], "token": GROUP_TOKENS["inventory"], "shards": own}
    settings = make_settings(
        fallback={"shards": SHARDS, "poll_interval": 0.2}, groups={"inventory": inventory}
    )
    ns = settings.fallback.namespace
    ids = [f"own-{i}" for i in range(40)]
    async with (
        own_runtime(settings, scanners=False) as rt,
        serving_app(create_app(rt)) as service_url,
    ):
        assert rt.switch is not None
        await rt.switch.trip("test: degraded on purpose")
        async with Producer(service_url, PRODUCER, retry=RETRY) as producer:
            await produce(producer, pool, ids)
        lengths = [int(await redis.xlen(k)) for k in shard_keys(ns, "inventory", own + 4)]
        assert sum(lengths) == len(ids) and sum(lengths[own:]) == 0
        assert sum(lengths[SHARDS:own]) > 0, "no entry beyond the consumer's own count"
        assert sum([int(await redis.xlen(k)) for k in shard_keys(ns, "wms", own)]) == len(ids)

        with caplog.at_level(logging.WARNING, logger="reliable_msg.transports.redis"):
            async with consuming(service_url, settings, pool):
                await wait_until(lambda: all_done(sdk_db, ids), within=30)
        assert any(
            "writes to 12 shards, not the 8 configured here" in r.getMessage()
            for r in caplog.records
        )
        lengths = [int(await redis.xlen(k)) for k in shard_keys(ns, "inventory", own)]
        assert sum(lengths) == 0
    await assert_one_effect_each(sdk_db, ids)
