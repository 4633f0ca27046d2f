"""The service and the consumer SDK on a three-node RabbitMQ cluster of the test run's own
(reliable_msg/harness/rabbit_cluster.py), as real processes: ``serve`` instances given
the three nodes, a consumer process, producers in the test.

One node killed with SIGKILL and started again mid-run loses nothing and trips nothing;
all three stopped, the service degrades to Redis and comes back. The machine's own node
on 5672 is never touched, which the first test checks.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest

from reliable_msg.harness.process import stop_gracefully
from reliable_msg.harness.rabbit_cluster import MACHINE_NODE, RabbitCluster
from reliable_msg.harness.servers import machine_rabbitmq_pids, rabbitmq_answers
from reliable_msg.sdk.client import RetryPolicy
from reliable_msg.sdk.consumer import Consumer
from reliable_msg.sdk.producer import Producer
from reliable_msg.service.settings import Settings
from reliable_msg.transports.redis import delete_namespace
from tests.conftest import AMQP_URL, GROUP_TOKENS, PRODUCER
from tests.helpers.cluster import ReadyWatch, peer_ports, produce_many, watching
from tests.helpers.consumers import inventory_consumer, inventory_process_env, running_effects
from tests.helpers.service import running, write_config
from tests.helpers.waiting import wait_until

MESSAGES = 2000
SHARDS = 8
#: Long enough for a confirm to outlast a node's loss, or the switch's trip.
RETRY = RetryPolicy(attempts=20, initial=0.1, max_wait=1.0, deadline=90.0)


@pytest.fixture
def settings(
    make_settings: Callable[..., Settings], rabbit_cluster: RabbitCluster, cluster_redis_url: str
) -> Settings:
    """The three nodes, quorum queues, and only group ``inventory`` on ``order.paid``: a
    message is done when the one consumer process has handled it."""
    return make_settings(
        amqp_url=",".join(rabbit_cluster.urls),
        redis_url=cluster_redis_url,
        queue_type="quorum",
        checkback={"after": 3600.0},  # the producers here always confirm, retrying
        redelivery={"ack_timeout": 5.0, "backoff_cap": 2.0, "max_attempts": 50},
        fallback={"failure_threshold": 3, "shards": SHARDS, "poll_interval": 0.2},
        groups={
            "credit": {"topics": ["order.refunded"], "token": GROUP_TOKENS["credit"]},
            "wms": {"topics": ["order.shipped"], "token": GROUP_TOKENS["wms"]},
        },
    )


@asynccontextmanager
async def consumer_process(
    service_url: str, settings: Settings, database_url: str, log: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``python -m tests.helpers.sdk_process consume inventory`` on the three nodes and
    the fallback; stopped with SIGTERM after the block, which it must exit cleanly."""
    env = inventory_process_env(
        service_url,
        settings,
        database_url,
        AMQP=settings.amqp_url,
        REDIS=settings.redis_url,
        NAMESPACE=settings.fallback.namespace,
        SHARDS=str(SHARDS),
        RMSG_LOG_LEVEL="info",
    )
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.helpers.sdk_process",
            "consume",
            "inventory",
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        codes = await stop_gracefully(proc, grace=20.0)
        assert codes == [0], tail(log)


@asynccontextmanager
async def traffic(
    urls: list[str], settings: Settings, database_url: str, log: Path
) -> AsyncIterator[tuple[ReadyWatch, Producer]]:
    """The :func:`consumer_process` on the first of the instances at ``urls``, their
    ``/readyz`` watched, and a producer of them all (:data:`RETRY`)."""
    async with (
        consumer_process(urls[0], settings, database_url, log),
        watching(urls) as watch,
        Producer(urls, PRODUCER, retry=RETRY) as producer,
    ):
        yield watch, producer


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


async def done_count(db: asyncpg.Connection, ids: list[str]) -> int:
    n = await db.fetchval(
        "SELECT count(*) FROM rmsg_message WHERE status = 'done' AND id = ANY($1::text[])", ids
    )
    return int(n)


async def assert_each_done_once(db: asyncpg.Connection, ids: list[str]) -> None:
    assert await done_count(db, ids) == len(ids)
    assert await db.fetchval("SELECT count(*) FROM rmsg_message WHERE status <> 'done'") == 0
    rows = await db.fetch("SELECT message_id, count(*) AS n FROM sdk_effects GROUP BY message_id")
    effects = {r["message_id"]: r["n"] for r in rows}
    assert sorted(effects) == sorted(ids), "a message has no effect"
    assert {n for n in effects.values()} == {1}, "a message was applied twice"


def machine_node_alone() -> list[str]:
    """The running nodes the machine's own node reports (read only)."""
    out = subprocess.run(
        ["rabbitmqctl", "-n", MACHINE_NODE, "-q", "cluster_status", "--formatter", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    status = json.loads(out)
    return sorted(status["running_nodes"] + status["disk_nodes"])


async def test_the_machines_node_is_never_touched() -> None:
    """Start, kill and destroy a cluster: the node on 5672 answers all along and is in
    no cluster but its own; and the tests that kill it can tell it from ours."""
    cluster = RabbitCluster(2)
    try:
        cluster.start()
        assert cluster.running_nodes() == sorted(n.name for n in cluster.nodes)
        assert machine_node_alone() == [MACHINE_NODE, MACHINE_NODE]
        # The tests that kill the machine's node kill it alone, never one of ours.
        ours = {node.vm_pid() for node in cluster.nodes}
        assert None not in ours
        machine = machine_rabbitmq_pids()
        assert len(machine) == 1 and not ours & set(machine)
        cluster.kill(1)
        assert cluster.running_nodes() == [cluster.nodes[0].name]
        assert await rabbitmq_answers(AMQP_URL)
    finally:
        cluster.destroy()
    assert not cluster.dir.exists()
    assert all(node.vm_pid() is None for node in cluster.nodes)
    assert await rabbitmq_answers(AMQP_URL)
    assert machine_node_alone() == [MACHINE_NODE, MACHINE_NODE]


async def test_consumer_keeps_consuming_when_its_node_is_killed(
    rabbit_cluster: RabbitCluster,
    settings: Settings,
    sdk_db: asyncpg.Connection,
    pool: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    cluster = rabbit_cluster
    first = [f"att-{i}" for i in range(50)]
    second = [f"att-after-{i}" for i in range(100)]
    config = write_config(settings, tmp_path / "config.toml")
    try:
        with running(config, tmp_path) as [instance]:
            consumer = inventory_consumer(
                instance.url,
                settings,
                pool,
                RETRY,
                Consumer,
                amqp_url=settings.amqp_url,
                redis_url=settings.redis_url,
                namespace=settings.fallback.namespace,
                shards=SHARDS,
                poll_interval=0.2,
            )
            async with (
                running_effects(consumer),
                watching([instance.url]) as watch,
                Producer(instance.url, PRODUCER, retry=RETRY) as producer,
            ):
                await produce_many(producer, pool, first)
                await wait_until(lambda: done_count_is(sdk_db, first), within=60)
                # This process holds no AMQP connection but the consumer's.
                attached = attached_nodes(cluster, os.getpid())
                assert len(attached) == 1, attached
                victim = attached[0]
                try:
                    await asyncio.to_thread(cluster.kill, victim)
                    await produce_many(producer, pool, second)
                    await wait_until(lambda: done_count_is(sdk_db, first + second), within=60)
                    now = attached_nodes(cluster, os.getpid())
                    assert now and victim not in now, now
                finally:
                    await asyncio.to_thread(cluster.restart, victim)
            assert watch.modes == {"normal"} and watch.history == [], (watch.seen, watch.history)
    finally:
        await delete_namespace(settings.redis_url, settings.fallback.namespace)
    await assert_each_done_once(sdk_db, first + second)


async def test_one_node_killed_and_restarted_mid_run_loses_nothing_trips_nothing(
    rabbit_cluster: RabbitCluster,
    settings: Settings,
    sdk_db: asyncpg.Connection,
    pool: asyncpg.Pool,
    database_url: str,
    tmp_path: Path,
) -> None:
    cluster = rabbit_cluster
    ids = [f"qk-{i:04d}" for i in range(MESSAGES)]
    config = write_config(settings, tmp_path / "config.toml")
    confirmed: list[str] = []
    try:
        with running(config, tmp_path, count=2) as instances:
            urls = [i.url for i in instances]
            queue = cluster.queue(settings.queue_name("inventory"))
            assert queue["type"] == "quorum"
            assert sorted(queue["members"]) == sorted(n.name for n in cluster.nodes)
            # The node that leads the group's queue goes.
            victim = cluster.index_of(queue["leader"])
            log = tmp_path / "consumer.log"
            async with traffic(urls, settings, database_url, log) as (watch, producer):
                started = time.monotonic()
                # The node is killed and started again while the first part goes; the
                # rest goes after its return.
                first = ids[: MESSAGES * 3 // 4]
                producing = asyncio.create_task(
                    produce_many(producer, pool, first, confirmed=confirmed)
                )

                def reached(n: int) -> Callable[[], bool]:
                    return lambda: len(confirmed) >= n or producing.done()

                await wait_until(reached(MESSAGES // 4), within=120)
                killed_at = len(confirmed)
                await asyncio.to_thread(cluster.kill, victim)
                await wait_until(reached(MESSAGES * 3 // 8), within=120)
                restarting = len(confirmed)
                await asyncio.to_thread(cluster.restart, victim)
                restarted_at = len(confirmed)
                await producing
                await produce_many(producer, pool, ids[len(first) :], confirmed=confirmed)
                await wait_until(lambda: done_count_is(sdk_db, ids), within=120, every=0.5)
                elapsed = time.monotonic() - started
            print(
                f"node {victim + 1} killed at {killed_at} confirmed, restarted from"
                f" {restarting} to {restarted_at}; {MESSAGES} done in {elapsed:.1f} s;"
                f" readyz seen {dict(watch.seen)}"
            )
            assert restarting < len(first), "the node was down for no publish"
            assert watch.modes == {"normal"}, watch.seen
            assert watch.history == [], "the switch flipped"
            queue = cluster.queue(settings.queue_name("inventory"))
            assert sorted(queue["online"]) == sorted(n.name for n in cluster.nodes)
    finally:
        await delete_namespace(settings.redis_url, settings.fallback.namespace)
    await assert_each_done_once(sdk_db, ids)


async def test_all_nodes_stopped_degrades_to_redis_and_back(
    rabbit_cluster: RabbitCluster,
    settings: Settings,
    sdk_db: asyncpg.Connection,
    pool: asyncpg.Pool,
    database_url: str,
    tmp_path: Path,
) -> None:
    cluster = rabbit_cluster
    before = [f"all-before-{i}" for i in range(100)]
    racing = [f"all-racing-{i}" for i in range(100)]
    during = [f"all-during-{i}" for i in range(200)]
    after = [f"all-after-{i}" for i in range(100)]
    config = write_config(settings, tmp_path / "config.toml")
    try:
        with running(config, tmp_path, count=2) as instances:
            urls = [i.url for i in instances]
            log = tmp_path / "consumer.log"
            async with traffic(urls, settings, database_url, log) as (watch, producer):
                await produce_many(producer, pool, before)
                await wait_until(lambda: done_count_is(sdk_db, before), within=60)
                try:
                    # Confirms race the nodes' shutdown, then go to Redis.
                    stopping = asyncio.create_task(asyncio.to_thread(cluster.stop_all))
                    await produce_many(producer, pool, racing)
                    await stopping
                    await produce_many(producer, pool, during)
                    await wait_until(lambda: watch.modes_now() == {"degraded"}, within=30)
                    # Through Redis end to end, while every node is down.
                    await wait_until(lambda: done_count_is(sdk_db, during), within=60)
                finally:
                    await asyncio.to_thread(cluster.start_all)
                await wait_until(lambda: watch.modes_now() == {"normal"}, within=90)
                await produce_many(producer, pool, after)
                everything = before + racing + during + after
                await wait_until(lambda: done_count_is(sdk_db, everything), within=90)
                await wait_until(
                    lambda: all(not any(r["fallback_depth"].values()) for r in watch.last.values()),
                    within=30,
                )
            assert [h["mode"] for h in watch.history] == ["normal", "degraded"], watch.history
    finally:
        await delete_namespace(settings.redis_url, settings.fallback.namespace)
    await assert_each_done_once(sdk_db, everything)


async def done_count_is(db: asyncpg.Connection, ids: list[str]) -> bool:
    return await done_count(db, ids) == len(ids)


def attached_nodes(cluster: RabbitCluster, pid: int) -> list[int]:
    """The nodes process ``pid`` holds AMQP connections to."""
    ports = peer_ports(pid)
    return [node.index for node in cluster.nodes if ports[node.amqp_port]]


async def test_a_service_started_while_one_node_is_down_works(
    rabbit_cluster: RabbitCluster,
    settings: Settings,
    sdk_db: asyncpg.Connection,
    pool: asyncpg.Pool,
    database_url: str,
    tmp_path: Path,
) -> None:
    """The topology declared, the node that took the first connection goes; an instance
    started then publishes through the others without tripping the switch."""
    cluster = rabbit_cluster
    ids = [f"late-{i}" for i in range(100)]
    config = write_config(settings, tmp_path / "config.toml")
    try:
        with running(config, tmp_path):
            pass  # the topology is declared
        victim = 0
        await asyncio.to_thread(cluster.kill, victim)
        try:
            with running(config, tmp_path) as [instance]:
                urls, log = [instance.url], tmp_path / "c.log"
                async with traffic(urls, settings, database_url, log) as (watch, producer):
                    await produce_many(producer, pool, ids)
                    await wait_until(lambda: done_count_is(sdk_db, ids), within=60)
                assert watch.modes == {"normal"} and watch.history == [], watch.history
        finally:
            await asyncio.to_thread(cluster.restart, victim)
    finally:
        await delete_namespace(settings.redis_url, settings.fallback.namespace)
    await assert_each_done_once(sdk_db, ids)
