"""Everything the service and the consumer do with Redis, on a Redis Cluster of three
masters of these tests' own (``redis_url = "redis+cluster://..."``): the switch and its
notices, the fallback writer and reader over every shard, the spread of one group's
shards over the masters, and a master lost."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime

import asyncpg
import pytest
import redis.asyncio as aioredis

from reliable_msg.errors import FallbackUnavailable
from reliable_msg.message import Publication
from reliable_msg.policy import shard_of
from reliable_msg.sdk.consumer import Consumer
from reliable_msg.sdk.producer import Producer
from reliable_msg.service.settings import Settings
from reliable_msg.transports.redis import (
    FallbackReader,
    FallbackWriter,
    Read,
    delete_namespace,
    ping,
    shard_keys,
)
from reliable_msg.transports.redis_client import RedisClient, redis_client
from reliable_msg.transports.switch import Mode, Switch
from tests.conftest import PRODUCER, served_runtime
from tests.helpers.adhoc_redis_cluster import AdhocCluster, adhoc_cluster
from tests.helpers.consumers import inventory_consumer, running_effects
from tests.helpers.waiting import wait_until
from tests.test_degradation import RETRY, all_done, assert_one_effect_each, produce

SHARDS = 100
GROUP = "inventory"


@pytest.fixture(scope="module")
def cluster() -> Iterator[AdhocCluster]:
    with adhoc_cluster() as c:
        yield c


@pytest.fixture
async def client(cluster: AdhocCluster) -> AsyncIterator[RedisClient]:
    c = redis_client(cluster.url, socket_timeout=2.0, socket_connect_timeout=2.0)
    yield c
    await c.aclose()


@pytest.fixture
def ns() -> str:
    return f"rmsg-test-{uuid.uuid4().hex[:8]}"


async def owners(cluster: AdhocCluster, keys: list[str]) -> dict[str, int]:
    """The port of the master that holds each key, as the cluster itself says
    (CLUSTER KEYSLOT and the slot map of CLUSTER SHARDS)."""
    node = aioredis.Redis(port=cluster.ports[0], decode_responses=True)
    try:
        ranges = []
        for first, last, master, *_ in await node.execute_command(  # type: ignore[no-untyped-call]
            "CLUSTER", "SLOTS"
        ):
            ranges.append((int(first), int(last), int(master[1])))
        found = {}
        for key in keys:
            slot = int(await node.execute_command("CLUSTER", "KEYSLOT", key))  # type: ignore[no-untyped-call]
            found[key] = next(port for lo, hi, port in ranges if lo <= slot <= hi)
        return found
    finally:
        await node.aclose()


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


def test_one_groups_shards_spread_over_every_master(cluster: AdhocCluster) -> None:
    keys = shard_keys("rmsg", GROUP, SHARDS)
    held = Counter(asyncio.run(owners(cluster, keys)).values())
    assert set(held) == set(cluster.ports), f"a master holds no shard: {held}"
    share = SHARDS / len(cluster.ports)
    assert max(held.values()) <= 2 * share, f"a master holds over twice its share: {held}"


async def test_the_switch_flips_clears_and_a_second_holder_hears_the_notice(
    cluster: AdhocCluster, client: RedisClient, ns: str
) -> None:
    other = redis_client(cluster.url)
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
        await delete_namespace(cluster.url, ns)


async def test_writer_to_reader_through_every_shard_on_every_master(
    cluster: AdhocCluster, client: RedisClient, ns: str
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
        by_master = Counter((await owners(cluster, [e.stream for e in read])).values())
        assert set(by_master) == set(cluster.ports), by_master
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
        await delete_namespace(cluster.url, ns)
    assert [k async for k in client.scan_iter(match=f"*{ns}*")] == []


async def test_a_lost_consumer_group_is_created_again(
    cluster: AdhocCluster, client: RedisClient, ns: str
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
        await delete_namespace(cluster.url, ns)


async def test_a_master_lost_is_fallback_unavailable_everywhere(ns: str) -> None:
    with adhoc_cluster() as own:
        client = redis_client(own.url, socket_timeout=1.0, socket_connect_timeout=1.0)
        switch = Switch(client, who="t", namespace=ns)
        writer = FallbackWriter(client, {GROUP: SHARDS}, namespace=ns, default_shards=8, alarm=100)
        reader = FallbackReader(client, namespace=ns, group=GROUP, shards=SHARDS, consumer="a")
        try:
            await switch.trip("test")
            await reader.prepare()
            await writer.write(publications(1))
            own.procs[1].kill()
            own.procs[1].wait()
            calls: dict[str, Callable[[], object]] = {
                "write": lambda: writer.write(publications(1)),
                "depth": lambda: writer.depth(GROUP),
                "read": lambda: reader.read(reader.keys, count=10),
                "reclaim": lambda: reader.reclaim(reader.keys, idle=0.0, count=10),
                "ping": lambda: ping(client),
                "switch": lambda: switch.clear("test"),
            }
            for _ in range(2):  # at once, then with the cluster down
                for name, call in calls.items():
                    started = time.monotonic()
                    with pytest.raises(FallbackUnavailable):
                        await call()  # type: ignore[misc]
                    assert time.monotonic() - started < 10, f"{name} took too long"
                await asyncio.sleep(3)  # cluster-node-timeout 1 s: the cluster is down now
        finally:
            await client.aclose()


async def test_the_service_and_a_consumer_run_degraded_on_a_cluster(
    cluster: AdhocCluster,
    make_settings: Callable[..., Settings],
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
) -> None:
    settings = make_settings(redis_url=cluster.url, fallback={"shards": 16, "poll_interval": 0.2})
    async with served_runtime(settings) as (runtime, url):
        ready = await runtime.degradation.ready()
        assert ready["redis"] == "ok", ready
        assert runtime.switch is not None
        await runtime.switch.trip("test: degraded on purpose")
        consumer = inventory_consumer(
            url,
            settings,
            pool,
            RETRY,
            Consumer,
            redis_url=cluster.url,
            namespace=settings.fallback.namespace,
            shards=16,
            poll_interval=0.2,
        )
        ids = [f"cl-{i}" for i in range(40)]
        async with Producer(url, PRODUCER, retry=RETRY) as producer:
            await produce(producer, pool, ids)
            depth = (await runtime.degradation.depths())["inventory"]
            assert depth == len(ids), "not written to the cluster's shards"
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
