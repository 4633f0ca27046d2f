"""Given the nodes of a RabbitMQ cluster, the service and the consumer SDK connect to the
first that answers and, after a loss, to the next one; the loss of one node does not
trip the switch, the loss of every node still does.

No cluster here: the "nodes" are the machine's RabbitMQ on 5672 reached directly, a dead
port, and fault proxies in front of 5672 that the tests cut (the three-node cluster test
is ``test_rabbitmq_cluster``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import asyncpg
import httpx
import pytest
from aio_pika.abc import AbstractChannel
from pamqp.common import FieldTable

from reliable_msg.errors import BrokerUnavailable
from reliable_msg.harness.ports import free_port
from reliable_msg.harness.proxy import FaultProxy
from reliable_msg.message import Publication
from reliable_msg.sdk.client import RetryPolicy
from reliable_msg.sdk.consumer import Consumer
from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from reliable_msg.transports.failover import Cursor, connect_nodes
from reliable_msg.transports.nodes import where
from reliable_msg.transports.publisher import SwitchingPublisher
from reliable_msg.transports.rabbitmq import PUBLISH_CHANNELS, RabbitMQ
from reliable_msg.transports.switch import Mode, SwitchState
from tests.conftest import AMQP_URL, PRODUCER, auth, served_runtime
from tests.helpers import rabbit
from tests.helpers.consumers import inventory_consumer, running_effects
from tests.helpers.service import remove_traces, running_async, write_config
from tests.helpers.waiting import wait_until

THRESHOLD = 3
RETRY = RetryPolicy(attempts=8, initial=0.05, max_wait=0.5, deadline=20.0)
#: A queue nothing fits in, that refuses what comes: RabbitMQ nacks a publish routed to it.
FULL: FieldTable = {"x-max-length": 0, "x-overflow": "reject-publish"}


def dead_node() -> str:
    """A node URL nothing listens on, with a password that must never be logged."""
    return f"amqp://guest:never-logged@127.0.0.1:{free_port()}/"


@pytest.fixture
async def proxy() -> AsyncIterator[FaultProxy]:
    """A fault proxy in front of the machine's RabbitMQ, for the test to cut."""
    async with FaultProxy("127.0.0.1", 5672) as proxy:
        yield proxy


def proxied_first(proxy: FaultProxy) -> list[str]:
    """The nodes of a two-node "cluster": 5672 through ``proxy``, then 5672 directly."""
    return [proxy.url("amqp", "guest:guest", "/"), AMQP_URL]


@asynccontextmanager
async def started(settings: Settings) -> AsyncIterator[tuple[RabbitMQ, AbstractChannel]]:
    """The transport of ``settings`` started, and a channel of the test's own straight to
    5672; at the end the transport closed and the topology deleted."""
    rabbitmq = RabbitMQ(settings)
    await rabbitmq.start()
    try:
        async with await aio_pika.connect(AMQP_URL) as amqp:
            yield rabbitmq, await amqp.channel()
    finally:
        await rabbitmq.close()
        await rabbit.delete_topology(AMQP_URL, settings)


async def nack_order_paid(channel: AbstractChannel, settings: Settings) -> None:
    """Bind to the exchange a :data:`FULL` queue of ``channel``'s: every ``order.paid``
    publish is nacked."""
    nacking = await channel.declare_queue(exclusive=True, arguments=FULL)
    await nacking.bind(settings.exchange, "order.paid")


def count_channels(rabbitmq: RabbitMQ, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """Count the channels ``rabbitmq`` opens from now on: the next number of the counter
    returned is how many it opened."""
    assert rabbitmq._connection is not None
    open_channel = rabbitmq._connection.channel
    opened = itertools.count()

    def counting(*args: Any, **kwargs: Any) -> Any:
        next(opened)
        return open_channel(*args, **kwargs)

    monkeypatch.setattr(rabbitmq._connection, "channel", counting)
    return opened


async def send(api: httpx.AsyncClient, id: str) -> httpx.Response:
    body = {"id": id, "topic": "order.paid", "payload": {"id": id}}
    r = await api.post("/v1/messages", json=body, headers=auth(PRODUCER))
    assert r.status_code == 201, r.text
    return await api.post(f"/v1/messages/{id}/confirm", headers=auth(PRODUCER))


def publication(id: str) -> Publication:
    now = datetime.now(UTC)
    return Publication(id, "order.paid", "order", "{}", {}, None, now, 1, groups=("wms",))


async def queued_ids(settings: Settings, group: str) -> list[str]:
    async with await aio_pika.connect(AMQP_URL) as amqp:
        messages = await rabbit.drain(amqp, settings.queue_name(group), wait=1.0)
    return [str(m.message_id) for m in messages]


async def test_a_reconnection_goes_to_the_next_node() -> None:
    """The hook aio-pika's robust connection calls for each attempt is ours: after the
    loss of the first node it reconnects to the second, with its channels."""
    async with FaultProxy("127.0.0.1", 5672) as proxy:
        first = proxy.url("amqp", "guest:guest", "/")
        cursor = Cursor((first, AMQP_URL))
        connection = await connect_nodes(cursor, attempt_timeout=5, reconnect_interval=0.2)
        try:
            assert where(str(connection.url)) == where(first)
            channel = await connection.channel()
            reconnected = asyncio.Event()
            connection.reconnect_callbacks.add(lambda *_: reconnected.set())
            await proxy.down()
            await asyncio.wait_for(reconnected.wait(), 15)
            assert where(str(connection.url)) == where(AMQP_URL)
            assert cursor.current == AMQP_URL
            queue = await channel.declare_queue(exclusive=True)  # the channel came back too
            assert queue.name
        finally:
            await connection.close()


async def test_the_first_connection_tries_each_node_in_turn() -> None:
    cursor = Cursor((dead_node(), AMQP_URL))
    connection = await connect_nodes(cursor, attempt_timeout=5)
    try:
        assert cursor.current == AMQP_URL
    finally:
        await connection.close()
    cursor = Cursor((dead_node(), dead_node()))
    with pytest.raises(ConnectionError):
        await connect_nodes(cursor, attempt_timeout=5)


async def test_each_node_connects_with_the_options_of_its_own_url() -> None:
    """A URL's query (``?heartbeat=``, the TLS files) is read by aiormq from the URL of
    the node it connects to, not from the first node's."""
    cursor = Cursor((dead_node() + "?heartbeat=7", AMQP_URL + "?heartbeat=9"))
    connection = await connect_nodes(cursor, attempt_timeout=5)
    try:
        assert connection.transport is not None
        assert connection.transport.connection.connection_tune.heartbeat == 9
    finally:
        await connection.close()


@pytest.mark.usefixtures("db")
async def test_the_service_starts_and_publishes_with_the_first_node_dead(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(redelivery={"ack_timeout": 3600.0})  # no redelivery
    dead = dead_node()
    config = write_config(settings, tmp_path / "config.toml", amqp_url=[dead, AMQP_URL])
    try:
        async with (
            running_async(config, tmp_path) as instance,
            httpx.AsyncClient(base_url=instance.url, timeout=15) as api,
        ):
            r = await send(api, "two-nodes")
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "sent"
            assert await queued_ids(settings, "wms") == ["two-nodes"]
            log = instance.log.read_text()
            assert "connected to RabbitMQ at 127.0.0.1:5672" in log
            assert "never-logged" not in log
    finally:
        await remove_traces(settings)


async def test_the_probe_queue_is_a_quorum_queue_like_the_groups(
    make_settings: Callable[..., Settings],
) -> None:
    """A classic queue lives on one node: with that node down another node refuses to
    declare it (NOT_FOUND: its home node is down), so the service could not connect, and
    routes nothing to it (NO_ROUTE), so the probe could not clear the switch. The probe
    queue is of ``queue_type``, and a classic one an older version left (probes only) is
    replaced at connection."""
    settings = make_settings(queue_type="quorum")
    old: FieldTable = {"x-max-length": 10, "x-overflow": "drop-head"}
    try:
        async with await aio_pika.connect(AMQP_URL) as amqp:
            channel = await amqp.channel()
            await channel.declare_queue(settings.probe_queue, durable=True, arguments=old)
        rabbitmq = RabbitMQ(settings)
        await rabbitmq.start()
        try:
            assert rabbitmq.connected
            await rabbitmq.probe()
        finally:
            await rabbitmq.close()
        async with await aio_pika.connect(AMQP_URL) as amqp:
            channel = await amqp.channel()
            quorum: FieldTable = {**old, "x-queue-type": "quorum"}  # refused unless it is one
            await channel.declare_queue(settings.probe_queue, durable=True, arguments=quorum)
    finally:
        await rabbit.delete_topology(AMQP_URL, settings)


async def watch(rt: Runtime, worst: list[int], stop: asyncio.Event) -> None:
    """Record the publisher's highest count of consecutive failures and the switch."""
    while not stop.is_set():
        worst[0] = max(worst[0], rt.publisher.failures)
        assert not rt.publisher.degraded, "the switch tripped"
        await asyncio.sleep(0.002)


async def unconfirmed(rabbitmq: RabbitMQ) -> bool:
    """Whether a publish on one of the publishing channels waits for its confirm."""
    for channel, _, _ in rabbitmq._channels:
        if channel.is_closed:
            continue
        underlay = await channel.get_underlay_channel()
        assert isinstance(underlay, aiormq.Channel)
        if underlay.confirmations:
            return True
    return False


@pytest.mark.usefixtures("db")
async def test_publishes_go_on_through_the_loss_of_one_node(
    make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
    proxy: FaultProxy,
) -> None:
    caplog.set_level(logging.DEBUG, "reliable_msg.transports.rabbitmq")
    settings = make_settings(
        amqp_url=proxied_first(proxy), fallback={"failure_threshold": THRESHOLD}
    )
    async with (
        served_runtime(settings) as (rt, url),
        httpx.AsyncClient(base_url=url, timeout=30) as api,
    ):
        ids = [f"fo-{i}" for i in range(400)]
        todo = iter(ids)
        answers: dict[str, int] = {}
        sent = asyncio.Event()

        async def worker() -> None:
            for id in todo:
                answers[id] = (await send(api, id)).status_code
                if len(answers) == 100:
                    sent.set()

        worst, stop = [0], asyncio.Event()
        watching = asyncio.create_task(watch(rt, worst, stop))
        workers = [asyncio.create_task(worker()) for _ in range(16)]
        await sent.wait()
        # Confirms no longer come back: once a publish waits for one, the first node
        # goes with it in flight (the workers spend most of their time elsewhere).
        proxy.stall()
        await wait_until(lambda: unconfirmed(rt.publisher.rabbitmq), within=1, every=0.001)
        await proxy.down()  # the first node is gone, publishes in flight with it
        await asyncio.gather(*workers)
        stop.set()
        await watching

        assert rt.publisher.rabbitmq._nodes.current == AMQP_URL
        assert proxy.accepted == 1
        assert {id: s for id, s in answers.items() if s != 200} == {}
        assert worst[0] < THRESHOLD
        assert rt.mode == "normal"
        # Every message is in the queue; one sent twice (its confirm lost with the
        # node) is dropped by the consumers' inbox.
        assert set(await queued_ids(settings, "wms")) == set(ids)
        waited = [r for r in caplog.records if "after a failover" in str(r.msg)]
        assert waited, "no publish was in flight at the loss: the test saw nothing"
        print(f"{len(waited)} publishes tried again; worst failures {worst[0]}")


@pytest.mark.usefixtures("db")
async def test_a_node_that_hangs_is_left_for_the_next(
    make_settings: Callable[..., Settings], proxy: FaultProxy
) -> None:
    """A node that stops answering without closing its connections (its machine gone, a
    partition: no reset comes) is left like a lost one: the publishes that time out on
    it go again through the next node, and the switch does not trip."""
    settings = make_settings(
        amqp_url=proxied_first(proxy), fallback={"failure_threshold": THRESHOLD}
    )
    async with (
        served_runtime(settings) as (rt, url),
        httpx.AsyncClient(base_url=url, timeout=30) as api,
    ):
        assert (await send(api, "before")).status_code == 200
        proxy.stall()
        ids = [f"hang-{i}" for i in range(THRESHOLD + 2)]
        answers = await asyncio.gather(*(send(api, id) for id in ids))
        assert [r.status_code for r in answers] == [200] * len(ids)
        assert not rt.publisher.degraded
        assert rt.publisher.rabbitmq._nodes.current == AMQP_URL
        assert (await send(api, "after")).status_code == 200
        assert set(await queued_ids(settings, "wms")) == {"before", *ids, "after"}


@pytest.mark.usefixtures("db")
async def test_with_every_node_down_the_switch_still_trips(
    make_settings: Callable[..., Settings],
) -> None:
    async with (
        FaultProxy("127.0.0.1", 5672) as one,
        FaultProxy("127.0.0.1", 5672) as two,
    ):
        settings = make_settings(
            amqp_url=[one.url("amqp", "guest:guest", "/"), two.url("amqp", "guest:guest", "/")],
            fallback={"failure_threshold": THRESHOLD, "probe_interval": 3600.0},
        )
        async with (
            served_runtime(settings) as (rt, url),
            httpx.AsyncClient(base_url=url, timeout=30) as api,
        ):
            assert (await send(api, "before")).status_code == 200
            lost = time.monotonic()
            await one.down()
            await two.down()
            await wait_until(lambda: not rt.publisher.connected, within=10)
            statuses = [(await send(api, f"down-{i}")).status_code for i in range(THRESHOLD)]
            tripped = time.monotonic() - lost
            # The first publish waits for another node until publish_timeout after the
            # loss, the next ones fail at once: the switch trips that much later.
            assert statuses == [503] * (THRESHOLD - 1) + [200]
            assert rt.publisher.degraded
            assert settings.publish_timeout <= tripped < settings.publish_timeout + 2.0
            print(f"tripped {tripped:.2f}s after the loss of every node")


@pytest.mark.usefixtures("sdk_db")
async def test_the_consumer_goes_on_through_the_other_node(
    make_settings: Callable[..., Settings], pool: asyncpg.Pool, proxy: FaultProxy
) -> None:
    settings = make_settings()
    counter = itertools.count()
    async with (
        served_runtime(settings) as (_, url),
        httpx.AsyncClient(base_url=url, timeout=30) as api,
    ):
        nodes = proxied_first(proxy)
        consumer = inventory_consumer(url, settings, pool, RETRY, Consumer, amqp_url=nodes)
        async with running_effects(consumer):

            async def sent_and_done(n: int) -> list[str]:
                ids = [f"c-{next(counter)}" for _ in range(n)]
                for id in ids:
                    assert (await send(api, id)).status_code == 200
                await wait_until(lambda: effects(pool, ids), within=30)
                return ids

            await sent_and_done(3)
            assert proxy.accepted == 1  # attached through the first node
            await proxy.down()
            await sent_and_done(5)
            assert consumer.mode.value == "normal"


async def effects(pool: asyncpg.Pool, ids: list[str]) -> bool:
    done = await pool.fetchval(
        "SELECT count(DISTINCT message_id) FROM sdk_effects WHERE message_id = ANY($1::text[])",
        ids,
    )
    return bool(done == len(ids))


async def test_a_publish_nacked_by_a_node_that_then_hangs_ends_within_its_bound(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, proxy: FaultProxy
) -> None:
    """A nacked publish opens a new channel and goes again there: the node nacks, then
    hangs (the new channel is never opened). The publish still ends, refused, within
    three times ``publish_timeout`` (README: Running on clusters), not when heartbeats
    notice the node minutes later."""
    settings = make_settings(amqp_url=proxied_first(proxy))
    async with started(settings) as (rabbitmq, channel):
        await nack_order_paid(channel, settings)
        renew = rabbitmq._renew

        async def hang_then_renew(*args: Any) -> None:
            proxy.stall()
            await renew(*args)

        monkeypatch.setattr(rabbitmq, "_renew", hang_then_renew)
        started_at = time.monotonic()
        try:
            with pytest.raises(BrokerUnavailable, match="refused"):
                async with asyncio.timeout(4 * settings.publish_timeout):
                    await rabbitmq.publish(publication("nacked-then-hung"))
            elapsed = time.monotonic() - started_at
            assert elapsed < 3 * settings.publish_timeout
        finally:
            proxy.resume()


async def test_publishes_nacked_together_on_a_channel_open_one_new_channel(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, proxy: FaultProxy
) -> None:
    """Many publishes nacked at once (a batch through a failover) renew each publishing
    channel once, not once each: they wait for the same new channel."""
    settings = make_settings(amqp_url=proxied_first(proxy))
    async with started(settings) as (rabbitmq, channel):
        await nack_order_paid(channel, settings)
        opened = count_channels(rabbitmq, monkeypatch)
        outs = [publication(f"nacked-{i}") for i in range(100)]
        assert len(await rabbitmq.publish_many(outs)) == 100  # all nacked, always
        # Within 2 s each tries five times (pauses of 0.1, 0.2, 0.4 and 0.8 s):
        # at most one new channel per channel at each try, not one per publish.
        assert next(opened) <= 5 * PUBLISH_CHANNELS


async def test_with_one_node_a_nacked_publish_is_refused_at_once(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new channel and the tries again after a nack are for clusters only: with one
    node a nack is refused at its first try, no channel opened, no wait."""
    settings = make_settings()
    async with started(settings) as (rabbitmq, channel):
        await nack_order_paid(channel, settings)
        opened = count_channels(rabbitmq, monkeypatch)
        started_at = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="refused"):
            await rabbitmq.publish(publication("nacked-once"))
        assert time.monotonic() - started_at < settings.publish_timeout / 4
        # The recovery probe the same.
        await channel.queue_delete(settings.probe_queue)
        await channel.declare_queue(settings.probe_queue, durable=True, arguments=FULL)
        started_at = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="probe failed"):
            await rabbitmq.probe()
        assert time.monotonic() - started_at < settings.publish_timeout / 4
        assert next(opened) == 0


async def test_the_probe_goes_again_on_new_channels_after_nacks(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With several nodes a nacked probe renews its channel and goes again, as a publish
    does. While degraded no publish goes to RabbitMQ: publishing channels that nack
    every probe (RabbitMQ 3.10, restored during the probe queue's leader election) would
    never be replaced and the switch never cleared. Here the probe queue is full and
    ``reject-publish`` until each publishing channel has nacked a probe, then is
    replaced by one that takes them: the same probe call goes on a new channel, 1.5 s
    of pauses later (``publish_timeout`` well above, for a loaded machine)."""
    settings = make_settings(amqp_url=[AMQP_URL, dead_node()], publish_timeout=5.0)
    async with started(settings) as (rabbitmq, channel):
        await channel.queue_delete(settings.probe_queue)
        await channel.declare_queue(settings.probe_queue, durable=True, arguments=FULL)
        renew = rabbitmq._renew
        nacked: list[AbstractChannel] = []

        async def replace_queue_then_renew(
            index: int, old: AbstractChannel, deadline: float
        ) -> None:
            nacked.append(old)
            if len(nacked) == PUBLISH_CHANNELS:
                await channel.queue_delete(settings.probe_queue)
                await channel.declare_queue(settings.probe_queue, durable=True)
            await renew(index, old, deadline)

        monkeypatch.setattr(rabbitmq, "_renew", replace_queue_then_renew)
        started_at = time.monotonic()
        await rabbitmq.probe()
        assert time.monotonic() - started_at < settings.publish_timeout
        assert len(set(nacked)) == PUBLISH_CHANNELS
        assert all(old.is_closed for old in nacked)
        assert not set(nacked) & {c for c, _, _ in rabbitmq._channels}
        probes = await channel.declare_queue(settings.probe_queue, passive=True)
        assert probes.declaration_result.message_count == 1


async def test_once_the_switch_is_cleared_a_publish_waits_for_the_reconnection(
    make_settings: Callable[..., Settings],
) -> None:
    """Every node was down long enough for publishes to fail at once. Another instance's
    probe clears the switch while this one still reconnects (its last try hit a node not
    back yet: a second more per node): its publishes wait for the connection as after a
    loss, within ``publish_timeout``, rather than trip the switch again at once
    (tests/test_rabbit_cluster.py saw it flip twice more within a second)."""
    async with (
        FaultProxy("127.0.0.1", 5672) as one,
        FaultProxy("127.0.0.1", 5672) as two,
    ):
        settings = make_settings(
            amqp_url=[one.url("amqp", "guest:guest", "/"), two.url("amqp", "guest:guest", "/")]
        )
        rabbitmq = RabbitMQ(settings)
        publisher = SwitchingPublisher(rabbitmq, None, None, failure_threshold=THRESHOLD)
        await rabbitmq.start()
        try:
            await one.down()
            await two.down()
            await wait_until(lambda: not rabbitmq.connected, within=10)
            await asyncio.sleep(settings.publish_timeout)
            with pytest.raises(BrokerUnavailable, match="not connected"):
                await rabbitmq.publish(publication("while-down"))
            await one.up()
            await two.up()
            publisher._switch_changed(SwitchState(Mode.NORMAL, "another instance"))
            await rabbitmq.publish(publication("once-back"))
            assert rabbitmq.connected
        finally:
            await rabbitmq.close()
            await rabbit.delete_topology(AMQP_URL, settings)
