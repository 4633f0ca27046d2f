"""One master of the Redis Cluster down (no replica, ``cluster-require-full-coverage
no``): the shards of the other masters go on being read and handled, and what the dead
master held comes back (from PostgreSQL) once it returns."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, cast

import asyncpg
import pytest
import redis
from redis.asyncio.cluster import RedisCluster as ClusterClient

from reliable_msg import constants
from reliable_msg.errors import BrokerUnavailable, FallbackUnavailable
from reliable_msg.harness.redis_cluster import RedisCluster
from reliable_msg.policy import shard_of
from reliable_msg.sdk.consumer import Consumer
from reliable_msg.sdk.producer import Producer
from reliable_msg.service.settings import Settings
from reliable_msg.transports.publisher import SwitchingPublisher
from reliable_msg.transports.redis import FallbackReader, FallbackWriter, delete_namespace, ping
from reliable_msg.transports.redis_client import redis_client
from reliable_msg.transports.switch import Mode, Switch
from tests.conftest import PRODUCER, served_runtime
from tests.helpers.consumers import fallback_consumer, running_effects
from tests.helpers.waiting import wait_until
from tests.test_degradation import RETRY, all_done, assert_one_effect_each, produce
from tests.test_redis_cluster import GROUP, SHARDS, publications


async def first_master(cluster: RedisCluster) -> int:
    """The master a cluster client sends ``COMMAND`` to when it loads the slot map again
    (its default node): the worst one to lose."""
    client = redis_client(cluster.url)
    assert isinstance(client, ClusterClient)
    try:
        await client.initialize()
        port = int(client.get_default_node().port)
    finally:
        await client.aclose()
    return [p for _, p in cluster.masters()].index(port)


def namespace_away_from(cluster: RedisCluster, lost: int) -> str:
    """A namespace whose switch is not on master ``lost``."""
    while True:
        ns = f"rmsg-test-{uuid.uuid4().hex[:8]}"
        if cluster.master_of(constants.SWITCH_KEY.format(ns=ns)) != lost:
            return ns


async def test_a_master_down_leaves_the_other_masters_shards_read(
    redis_cluster: RedisCluster,
) -> None:
    lost = await first_master(redis_cluster)
    ns = namespace_away_from(redis_cluster, lost)
    client = redis_client(redis_cluster.url, socket_timeout=1.0, socket_connect_timeout=1.0)
    writer = FallbackWriter(client, {GROUP: SHARDS}, namespace=ns, default_shards=8, alarm=100)
    reader = FallbackReader(client, namespace=ns, group=GROUP, shards=SHARDS, consumer="a")
    outs = publications(1)
    try:
        await reader.prepare()
        await writer.write(outs)
        on_lost = {o.id for o in outs if redis_cluster.master_of(writer.key_for(GROUP, o)) == lost}
        assert 0 < len(on_lost) < len(outs)
        redis_cluster.kill(lost)

        started = time.monotonic()
        await reader.prepare()  # the others' groups are there: no error
        read = await reader.read(reader.keys, count=10)
        assert time.monotonic() - started < 10
        expected = {o.id for o in outs} - on_lost
        assert sorted(e.id for e in read) == sorted(expected)  # type: ignore[union-attr]
        reclaimed = await reader.reclaim(reader.keys, idle=0.0, count=10)
        assert sorted(e.entry_id for e in reclaimed) == sorted(e.entry_id for e in read)
        for entry in read:
            await reader.done(entry)
        assert await reader.read(reader.keys, count=10) == []
        # The depth stays unknown while a master is away: no "empty" from part of it.
        with pytest.raises(FallbackUnavailable, match=str(redis_cluster.masters()[lost][1])):
            await reader.depth()
        # Readiness says which master is away.
        with pytest.raises(FallbackUnavailable, match=str(redis_cluster.masters()[lost][1])):
            await ping(client)

        redis_cluster.restart(lost)  # back empty: its entries were lost with it
        await wait_until(lambda: _answers(client), within=20)
        await writer.write(outs)
        # The new streams of the returned master have no group at the first read, which
        # creates it; the second finds them.
        again = await reader.read(reader.keys, count=10)
        again += await reader.read(reader.keys, count=10)
        assert sorted(e.id for e in again) == sorted(o.id for o in outs)  # type: ignore[union-attr]
    finally:
        await client.aclose()
        await delete_namespace(redis_cluster.url, ns)


async def _answers(client: object) -> bool:
    try:
        await ping(client)  # type: ignore[arg-type]
        return True
    except FallbackUnavailable:
        return False


async def test_a_consumer_handles_the_live_masters_shards_while_one_is_down(
    redis_cluster: RedisCluster,
    make_settings: Callable[..., Settings],
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
) -> None:
    shards = 16
    lost = await first_master(redis_cluster)
    settings = make_settings(
        redis_url=redis_cluster.url,
        fallback={
            "shards": shards,
            "poll_interval": 0.2,
            "namespace": namespace_away_from(redis_cluster, lost),
        },
        redelivery={"ack_timeout": 3.0, "max_attempts": 10},
    )
    ns = settings.fallback.namespace
    async with served_runtime(settings) as (runtime, url):
        assert runtime.switch is not None
        await runtime.switch.trip("test: degraded on purpose")
        ids = [f"md-{i}" for i in range(40)]
        async with Producer(url, PRODUCER, retry=RETRY) as producer:
            await produce(producer, pool, ids)
        assert (await runtime.degradation.depths())["inventory"] == len(ids)

        def on_lost(id: str) -> bool:
            key = f"{ns}:fb:{{inventory:{shard_of(id, shards)}}}"
            return redis_cluster.master_of(key) == lost

        gone = [id for id in ids if on_lost(id)]
        kept = [id for id in ids if not on_lost(id)]
        assert gone and kept
        redis_cluster.kill(lost)
        consumer = fallback_consumer(
            url, settings, pool, RETRY, Consumer, shards=shards, claim_idle=30.0
        )
        try:
            async with running_effects(consumer, stop_within=20):
                # While the master is down, the entries of the others are handled.
                await wait_until(lambda: all_done(sdk_db, kept), within=30)
                assert consumer.mode is Mode.DEGRADED
                redis_cluster.restart(lost)

                # What the lost master held is redelivered from PostgreSQL (the
                # redelivery scanner's rounds, run here).
                async def redelivered() -> bool:
                    await runtime.redelivery.run_once()
                    return await all_done(sdk_db, ids)

                await wait_until(redelivered, within=60, every=0.5)
                assert await runtime.switch.clear("test: back")
                await wait_until(lambda: consumer.mode is Mode.NORMAL, within=20)
        finally:
            redis_cluster.heal()
    await assert_one_effect_each(sdk_db, ids)


async def test_the_switch_flips_while_another_master_is_down(redis_cluster: RedisCluster) -> None:
    lost = await first_master(redis_cluster)
    ns = namespace_away_from(redis_cluster, lost)
    home = redis_cluster.master_of(constants.SWITCH_KEY.format(ns=ns))
    # A master that never ran the switch's script (a new or restarted one).
    port = redis_cluster.masters()[home][1]
    with redis.Redis(port=port) as node:
        node.script_flush()
    client = redis_client(redis_cluster.url, socket_timeout=1.0, socket_connect_timeout=1.0)
    switch = Switch(client, who="t", namespace=ns)
    try:
        redis_cluster.kill(lost)
        assert await switch.trip("RabbitMQ down, one Redis master down too")
        assert switch.degraded
        assert await switch.clear("back")
        assert [h["mode"] for h in await switch.history()] == ["normal", "degraded"]
    finally:
        await client.aclose()
        redis_cluster.heal()
        await delete_namespace(redis_cluster.url, ns)


async def test_a_batch_touching_a_dead_masters_shard_is_refused_whole(
    redis_cluster: RedisCluster,
) -> None:
    """The service's side: a batch whose messages go to a shard of the dead master is
    refused as an outage (the messages stay pending, to be published again); none is
    taken as published. Those of the batch that went to live masters are written
    too, so they may come twice (the consumer's inbox takes each once)."""
    lost = await first_master(redis_cluster)
    ns = namespace_away_from(redis_cluster, lost)
    client = redis_client(redis_cluster.url, socket_timeout=1.0, socket_connect_timeout=1.0)
    writer = FallbackWriter(client, {GROUP: SHARDS}, namespace=ns, default_shards=8, alarm=100)
    switch = Switch(client, who="t", namespace=ns)
    publisher = SwitchingPublisher(cast(Any, None), writer, switch, failure_threshold=3)
    outs = publications(1)[:10]
    try:
        await switch.trip("test: degraded")
        on_lost = [o for o in outs if redis_cluster.master_of(writer.key_for(GROUP, o)) == lost]
        assert on_lost and len(on_lost) < len(outs)
        redis_cluster.kill(lost)
        refused = await publisher.publish_many(outs)
        assert sorted(refused) == sorted(o.id for o in outs)
        assert all(isinstance(e, BrokerUnavailable) for e in refused.values())
        live = [o for o in outs if o not in on_lost]
        assert await publisher.publish_many(live) == {}  # the live masters' shards take theirs
        assert await publisher.publish_many(on_lost[:1]) != {}
    finally:
        await client.aclose()
        redis_cluster.heal()
        await delete_namespace(redis_cluster.url, ns)
