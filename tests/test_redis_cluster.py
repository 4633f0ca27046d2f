"""Everything the service and the consumer do with Redis, on a Redis Cluster of three
masters of these tests' own (``redis_url = "redis+cluster://..."``): the switch and its
notices, the fallback writer and reader over every shard, the spread of one group's
shards over the masters, and a master lost."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import asyncpg
import pytest
import redis

from reliable_msg import constants
from reliable_msg.errors import FallbackUnavailable
from reliable_msg.harness.redis_cluster import RedisCluster
from reliable_msg.message import Publication
from reliable_msg.policy import shard_of
from reliable_msg.sdk.consumer import Consumer
from reliable_msg.sdk.producer import Producer
from reliable_msg.service.settings import Settings
from reliable_msg.transports.redis import (
    FallbackReader,
    FallbackWriter,
    delete_namespace,
    ping,
    shard_key,
    shard_keys,
)
from reliable_msg.transports.redis_client import RedisClient, redis_client
from reliable_msg.transports.redis_entries import Read
from reliable_msg.transports.switch import Mode, Switch
from tests.conftest import PRODUCER, served_runtime
from tests.helpers.consumers import fallback_consumer, running_effects
from tests.helpers.waiting import wait_until
from tests.test_degradation import RETRY, all_done, assert_one_effect_each, produce

SHARDS = 100
GROUP = "inventory"


@pytest.fixture
async def client(redis_cluster: RedisCluster) -> AsyncIterator[RedisClient]:
    c = redis_client(redis_cluster.url, socket_timeout=2.0, socket_connect_timeout=2.0)
    yield c
    await c.aclose()


@pytest.fixture
def ns() -> str:
    return f"rmsg-test-{uuid.uuid4().hex[:8]}"


def owners(cluster: RedisCluster, keys: list[str]) -> dict[str, int]:
    """The port of the master that holds each key, as the cluster itself says
    (CLUSTER KEYSLOT and its slot map)."""
    ports = [port for _, port in cluster.masters()]
    return {key: ports[cluster.master_of(key)] for key in set(keys)}


def publications(count_per_shard: int) -> list[Publication]:
    """Messages for :data:`GROUP`, ``count_per_shard`` in each of its shards."""
    keys: dict[int, list[str]] = {}
    i = 0
    while len(keys) < SHARDS or min(len(v) for v in keys.values()) < count_per_shard:
        key = f"member-{i}"
        i += 1
        in_shard = keys.setdefault(shard_of(key, SHARDS), [])
        if len(in_shard) < count_per_shard:
            in_shard.append(key)
    now = datetime.now(UTC)
    return [
        Publication(
            id=f"m-{key}",
            topic="order.paid",
            producer="order",
            payload='{"n": 1}',
            headers={},
            key=key,
            created_at=now,
            attempt=1,
            groups=(GROUP,),
        )
        for shard_keys_ in keys.values()
        for key in shard_keys_
    ]


def test_one_groups_shards_spread_over_every_master(redis_cluster: RedisCluster) -> None:
    keys = shard_keys("rmsg", GROUP, SHARDS)
    held = Counter(owners(redis_cluster, keys).values())
    assert set(held) == {port for _, port in redis_cluster.masters()}, (
        f"a master holds no shard: {held}"
    )
    share = SHARDS / len(redis_cluster.masters())
    assert max(held.values()) <= 2 * share, f"a master holds over twice its share: {held}"


async def test_the_switch_flips_clears_and_a_second_holder_hears_the_notice(
    redis_cluster: RedisCluster, client: RedisClient, ns: str
) -> None:
    other = redis_client(redis_cluster.url)
    flipper = Switch(client, who="flipper", namespace=ns)
    # No re-read for a minute: what the watcher learns within seconds came as a notice.
    watcher = Switch(other, who="watcher", namespace=ns, poll_interval=60.0)
    heard: list[Mode] = []
    watcher.on_change(lambda state: heard.append(state.mode))
    watching = asyncio.create_task(watcher.watch())
    try:
        await asyncio.sleep(0.5)  # subscribed
        assert await flipper.trip("test: on")
        assert not await flipper.trip("test: on again")
        await wait_until(lambda: watcher.degraded, within=5)
        assert await flipper.clear("test: off")
        await wait_until(lambda: not watcher.degraded, within=5)
        assert heard == [Mode.DEGRADED, Mode.NORMAL]
        history = await watcher.history()
        assert [h["mode"] for h in history] == ["normal", "degraded"]
        assert history[0]["by"] == "flipper"
    finally:
        watcher.stop()
        await asyncio.wait_for(watching, 5)
        await other.aclose()
        await delete_namespace(redis_cluster.url, ns)


async def test_writer_to_reader_through_every_shard_on_every_master(
    redis_cluster: RedisCluster, client: RedisClient, ns: str
) -> None:
    writer = FallbackWriter(
        client, {GROUP: SHARDS}, namespace=ns, default_shards=8, alarm=1_000_000
    )
    outs = publications(2)
    try:
        await writer.write(outs[: len(outs) // 2])
        await writer.write(outs[len(outs) // 2 :])
        assert await writer.depth(GROUP) == len(outs)

        readers = [
            FallbackReader(client, namespace=ns, group=GROUP, shards=8, consumer=name)
            for name in ("a", "b")
        ]
        first, second = readers
        assert await first.learn_shards() == SHARDS  # as the writer recorded it
        await first.prepare()
        read = await first.read(first.keys, count=10)
        assert sorted(e.id for e in read) == sorted(o.id for o in outs)  # type: ignore[union-attr]
        by_master = Counter(owners(redis_cluster, [e.stream for e in read]).values())
        assert set(by_master) == {port for _, port in redis_cluster.masters()}, by_master
        assert await first.read(first.keys, count=10) == []

        # What "a" read and did not ack, "b" reclaims.
        await second.learn_shards()
        reclaimed = await second.reclaim(second.keys, idle=0.0, count=10)
        assert sorted(e.entry_id for e in reclaimed) == sorted(e.entry_id for e in read)
        for entry in reclaimed[1:]:
            await second.done(entry)
        await second.bury(reclaimed[0], "test: no handler")
        assert await writer.depth(GROUP) == 0
        assert await writer.dead(GROUP) == 1
        assert await second.reclaim(second.keys, idle=0.0, count=10) == []
    finally:
        await delete_namespace(redis_cluster.url, ns)
    for _, port in redis_cluster.masters():  # every master asked on its own
        with redis.Redis(port=port) as node:
            assert list(node.scan_iter(match=f"*{ns}*")) == [], f"keys left on {port}"


async def test_a_lost_consumer_group_is_created_again(
    redis_cluster: RedisCluster, client: RedisClient, ns: str
) -> None:
    writer = FallbackWriter(client, {GROUP: SHARDS}, namespace=ns, default_shards=8, alarm=100)
    reader = FallbackReader(client, namespace=ns, group=GROUP, shards=SHARDS, consumer="a")
    outs = publications(1)
    try:
        await reader.prepare()
        keys = [writer.key_for(GROUP, o) for o in outs[:3]]
        await client.delete(*keys)  # streams and their groups gone, on several masters
        await writer.write(outs)
        found: list[Read] = await reader.read(reader.keys, count=10)
        assert len(found) == len(outs) - 3  # the three new streams had no group yet
        found = await reader.read(reader.keys, count=10)
        assert sorted(e.id for e in found) == sorted(o.id for o in outs[:3])  # type: ignore[union-attr]
    finally:
        await delete_namespace(redis_cluster.url, ns)


async def test_a_master_lost_is_fallback_unavailable_and_its_return_is_used(
    redis_cluster: RedisCluster, ns: str
) -> None:
    client = redis_client(redis_cluster.url, socket_timeout=1.0, socket_connect_timeout=1.0)
    other = redis_client(redis_cluster.url, socket_timeout=1.0, socket_connect_timeout=1.0)
    switch = Switch(client, who="t", namespace=ns)
    watcher = Switch(other, who="watcher", namespace=ns, poll_interval=0.5)
    watching = asyncio.create_task(watcher.watch())
    writer = FallbackWriter(client, {GROUP: SHARDS}, namespace=ns, default_shards=8, alarm=100)
    reader = FallbackReader(client, namespace=ns, group=GROUP, shards=SHARDS, consumer="a")
    try:
        await switch.trip("test")
        await reader.prepare()
        await writer.write(publications(1))
        await wait_until(lambda: watcher.degraded, within=5)
        # The master of the switch, of its notices and of some of the shards.
        lost = redis_cluster.master_of(constants.SWITCH_KEY.format(ns=ns))
        redis_cluster.kill(lost)
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "write": lambda: writer.write(publications(1)),
            "depth": lambda: writer.depth(GROUP),
            "ping": lambda: ping(client),
            "switch": lambda: switch.clear("test"),
            "history": lambda: switch.history(),
        }
        for name, call in calls.items():
            started = time.monotonic()
            with pytest.raises(FallbackUnavailable):
                await call()
            # redis-py's cluster client retries (reloading the slot map) before it gives up
            assert time.monotonic() - started < 10, f"{name} took too long"
        assert not watching.done(), "the watcher gave up"
        # The reader reads the shards of the masters left (test_redis_cluster_master_down).
        read = await reader.read(reader.keys, count=10)
        assert read and all(redis_cluster.master_of(e.stream) != lost for e in read)

        # Back, empty: the same clients use it again, and the watcher follows the switch.
        redis_cluster.restart(lost)

        async def answers() -> bool:
            try:
                await ping(client)
                return True
            except FallbackUnavailable:
                return False

        await wait_until(answers, within=20)
        # The switch was lost with its master: the watcher's re-read finds it normal.
        await wait_until(lambda: not watcher.degraded, within=10)
        assert await switch.trip("test: again")
        await wait_until(lambda: watcher.degraded, within=10)
        await reader.prepare()
        await writer.write(publications(1))
        assert len(await reader.read(reader.keys, count=10)) >= SHARDS
    finally:
        watcher.stop()
        await asyncio.wait_for(watching, 10)
        await client.aclose()
        await other.aclose()
        await delete_namespace(redis_cluster.url, ns)


def move_slot(cluster: RedisCluster, key: str, to: int) -> None:
    """Move the slot of ``key``, with its keys, to master ``to``, as a resharding does."""
    ports = [port for _, port in cluster.masters()]
    source = ports[cluster.master_of(key)]
    target = ports[to]
    if source == target:
        return
    clients = {port: redis.Redis(port=port, decode_responses=True) for port in ports}
    try:
        ids = {port: c.cluster("MYID") for port, c in clients.items()}
        src, dst = clients[source], clients[target]
        slot = int(src.cluster("KEYSLOT", key))
        dst.cluster("SETSLOT", slot, "IMPORTING", ids[source])
        src.cluster("SETSLOT", slot, "MIGRATING", ids[target])
        while keys := src.cluster("GETKEYSINSLOT", slot, 100):
            src.migrate("127.0.0.1", target, keys, 0, 5000)
        for c in clients.values():
            c.cluster("SETSLOT", slot, "NODE", ids[target])
    finally:
        for c in clients.values():
            c.close()


async def test_a_slot_moved_to_another_master_is_followed(
    redis_cluster: RedisCluster, client: RedisClient, ns: str
) -> None:
    switch = Switch(client, who="t", namespace=ns)
    writer = FallbackWriter(client, {GROUP: SHARDS}, namespace=ns, default_shards=8, alarm=100)
    reader = FallbackReader(client, namespace=ns, group=GROUP, shards=SHARDS, consumer="a")
    outs = publications(1)
    switch_key = constants.SWITCH_KEY.format(ns=ns)
    shard = writer.key_for(GROUP, outs[0])
    homes = {key: redis_cluster.master_of(key) for key in (switch_key, shard)}
    try:
        await switch.trip("before")
        await reader.prepare()
        await writer.write(outs)
        for key, home in homes.items():  # the client's map is now out of date: MOVED
            move_slot(redis_cluster, key, (home + 1) % 3)
            assert redis_cluster.master_of(key) != home
        assert await switch.clear("after the move")
        assert [h["mode"] for h in await switch.history()] == ["normal", "degraded"]
        await writer.write(outs)
        read = await reader.read(reader.keys, count=10)
        assert len(read) == 2 * len(outs)
        for entry in read:
            await reader.done(entry)  # XACK and XDEL in one transaction, on the moved slot
        assert await writer.depth(GROUP) == 0
    finally:
        for key, home in homes.items():
            move_slot(redis_cluster, key, home)
        await delete_namespace(redis_cluster.url, ns)


async def test_the_service_and_a_consumer_run_degraded_on_a_cluster(
    redis_cluster: RedisCluster,
    make_settings: Callable[..., Settings],
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
) -> None:
    settings = make_settings(
        redis_url=redis_cluster.url, fallback={"shards": 16, "poll_interval": 0.2}
    )
    async with served_runtime(settings) as (runtime, url):
        ready = await runtime.degradation.ready()
        assert ready["redis"] == "ok", ready
        assert runtime.switch is not None
        await runtime.switch.trip("test: degraded on purpose")
        consumer = fallback_consumer(
            url, settings, pool, RETRY, Consumer, shards=16, claim_idle=30.0
        )
        ids = [f"cl-{i}" for i in range(40)]
        async with Producer(url, PRODUCER, retry=RETRY) as producer:
            await produce(producer, pool, ids)
            depth = (await runtime.degradation.depths())["inventory"]
            assert depth == len(ids), "not written to the cluster's shards"
            ns = settings.fallback.namespace
            written = {shard_key(ns, "inventory", shard_of(id, 16)) for id in ids}
            masters = {port for _, port in redis_cluster.masters()}
            assert set(owners(redis_cluster, list(written)).values()) == masters
            async with running_effects(consumer, stop_within=20):
                await wait_until(lambda: all_done(sdk_db, ids), within=30)
                assert consumer.mode is Mode.DEGRADED
                assert await runtime.switch.clear("test: back")
                await wait_until(lambda: consumer.mode is Mode.NORMAL, within=15)
                after = [f"cl-after-{i}" for i in range(5)]
                await produce(producer, pool, after)
                await wait_until(lambda: all_done(sdk_db, after), within=30)
        assert (await runtime.degradation.depths())["inventory"] == 0
    await assert_one_effect_each(sdk_db, ids + after)
