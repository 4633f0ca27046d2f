"""One master of the Redis Cluster lost while degraded (issue 16): RabbitMQ is stopped, the
messages wait in the fallback shards spread over three masters, and one master holding
some of them is killed with SIGKILL and started again, empty (no persistence). Every
message still ends done with one effect: the entries that went with the master are
redelivered from PostgreSQL by the service's redelivery scanner (``ack_timeout``
shortened here from its 30 s default), through the shards again. RabbitMQ is stopped for
real: run under the exclusive services lock."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg

from reliable_msg import constants
from reliable_msg.harness.redis_cluster import RedisCluster
from reliable_msg.sdk.consumer import Consumer
from reliable_msg.sdk.producer import Producer
from reliable_msg.service.api import create_app
from reliable_msg.service.settings import Settings
from reliable_msg.transports.redis import shard_keys
from reliable_msg.transports.redis_client import RedisClient, redis_client
from reliable_msg.transports.switch import Mode
from tests.conftest import PRODUCER
from tests.helpers import rabbit
from tests.helpers.consumers import fallback_consumer, running_effects
from tests.helpers.servers import serving_app
from tests.helpers.waiting import wait_until
from tests.test_degradation import (
    RETRY,
    SHARDS,
    all_done,
    assert_one_effect_each,
    own_runtime,
    produce,
)


async def ids_in(redis: RedisClient, keys: list[str], *, unread: bool = False) -> set[str]:
    """The message ids of the entries in ``keys``; with ``unread``, of those no consumer
    has read yet (not in the stream group's pending list)."""
    found: set[str] = set()
    for key in keys:
        entries: Any = await redis.xrange(key)
        read: set[bytes] = set()
        if unread and entries:
            pending: Any = await redis.xpending_range(
                key, constants.FALLBACK_READERS, min="-", max="+", count=len(entries)
            )
            read = {p["message_id"] for p in pending}
        found.update(fields[b"id"].decode() for at, fields in entries if at not in read)
    return found


def victim(cluster: RedisCluster, settings: Settings, lengths: dict[str, int]) -> int:
    """A master holding entries of the ``inventory`` shards, and not the namespace's keys
    (the switch, the shard counts): its loss takes entries only, the switch stays
    degraded."""
    ns = settings.fallback.namespace
    keeps_switch = cluster.master_of(constants.SWITCH_KEY.format(ns=ns))
    holding = {cluster.master_of(key) for key, n in lengths.items() if n}
    candidates = sorted(holding - {keeps_switch})
    assert candidates, f"every entry is on the switch's master: {lengths}"
    return candidates[0]


async def test_a_master_killed_while_degraded_loses_nothing(
    redis_cluster: RedisCluster,
    make_settings: Callable[..., Settings],
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
) -> None:
    settings = make_settings(
        redis_url=redis_cluster.url,
        fallback={"failure_threshold": 3, "shards": SHARDS, "poll_interval": 0.2},
        publish_timeout=1.0,
        # What Redis lost is sent again 2 s after its publish, not 30 s.
        redelivery={"ack_timeout": 2.0, "backoff_cap": 1.0, "max_attempts": 50},
    )
    ids = [f"lost-{i}" for i in range(40)]
    keys = shard_keys(settings.fallback.namespace, "inventory", SHARDS)
    gate = asyncio.Event()
    redis = redis_client(redis_cluster.url)
    async with (
        own_runtime(settings, scanners=True) as rt,
        serving_app(create_app(rt)) as service_url,
        Producer(service_url, PRODUCER, retry=RETRY) as producer,
    ):
        consumer = fallback_consumer(service_url, settings, pool, RETRY, Consumer, shards=SHARDS)
        try:
            async with running_effects(consumer, gate=gate):
                with rabbit.stopped():
                    await wait_until(lambda: not rt.publisher.connected, within=15)
                    await produce(producer, pool, ids)
                    assert rt.switch is not None and rt.switch.degraded
                    await wait_until(lambda: consumer.mode is Mode.DEGRADED, within=15)

                    # The consumer holds what it read (the gate); the rest waits in the shards.
                    lengths = {key: int(await redis.xlen(key)) for key in keys}
                    assert sum(lengths.values()) == len(ids)
                    i = victim(redis_cluster, settings, lengths)
                    on_victim = [k for k in keys if redis_cluster.master_of(k) == i]
                    lost = await ids_in(redis, on_victim)
                    assert lost, "no entry on the master killed"
                    # Entries the consumer holds at the gate are handled from its memory
                    # (their message done at attempt 1 unless redelivered meanwhile); the
                    # unread ones can come back only from PostgreSQL.
                    unread = await ids_in(redis, on_victim, unread=True)
                    assert unread, "the consumer had read every entry of the master killed"
                    redis_cluster.kill(i)
                    redis_cluster.restart(i)
                    assert await ids_in(redis, on_victim) == set(), "the master kept its entries"

                    gate.set()
                    await wait_until(lambda: all_done(sdk_db, ids), within=60)
                    assert rt.switch.degraded, "the switch cleared while RabbitMQ was down"
                    assert consumer.mode is Mode.DEGRADED
        finally:
            await redis.aclose()
    await assert_one_effect_each(sdk_db, ids)
    # Sent again from PostgreSQL: the lost entries no consumer had read have a second
    # attempt.
    attempts = await sdk_db.fetch(
        "SELECT message_id, attempts FROM rmsg_delivery"
        " WHERE group_name = 'inventory' AND message_id = ANY($1::text[])",
        sorted(unread),
    )
    assert len(attempts) == len(unread) and all(r["attempts"] >= 2 for r in attempts), attempts
