"""Publishes a RabbitMQ that is up refuses (no queue takes the message) are counted,
reported and bounded: the topology is declared again, each scanner pass logs one
warning with the ids, ``rmsg_publish_refusals_total`` counts them, and after
``max_refusals`` the message or delivery goes ``dead`` where an admin can requeue it.
None of it trips the degradation switch."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable

import aio_pika
import asyncpg
import httpx
import pytest
from aio_pika.abc import ExchangeType
from prometheus_client import REGISTRY

from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from reliable_msg.transports.topology import declare_topology
from tests.conftest import ADMIN, GROUP_TOKENS, PRODUCER, auth
from tests.helpers import rabbit
from tests.helpers.checkback import ProducerEndpoint, checked_at
from tests.helpers.waiting import wait_until

MAX_REFUSALS = 3


@pytest.fixture
def settings(
    make_settings: Callable[..., Settings], endpoint: tuple[ProducerEndpoint, int]
) -> Settings:
    _, port = endpoint
    return make_settings(
        max_refusals=MAX_REFUSALS,
        producers=checked_at(port, PRODUCER),
        checkback={"timeout": 0.5, "lease": 0.6},
        redelivery={"jitter": 0.0, "backoff_cap": 0.5, "retry_after_failure": 0.1},
    )


def refusals(reason: str = "unroutable") -> float:
    return REGISTRY.get_sample_value("rmsg_publish_refusals_total", {"reason": reason}) or 0.0


async def send(client: httpx.AsyncClient, id: str, topic: str = "order.paid") -> None:
    body = {"id": id, "topic": topic, "payload": {"n": 1}}
    r = await client.post("/v1/messages", json=body, headers=auth(PRODUCER))
    assert r.status_code == 201, r.text
    r = await client.post(f"/v1/messages/{id}/confirm", headers=auth(PRODUCER))
    assert r.status_code == 200, r.text


async def ack(client: httpx.AsyncClient, id: str, group: str) -> None:
    r = await client.post(f"/v1/messages/{id}/ack", headers=auth(GROUP_TOKENS[group]))
    assert r.status_code == 200, r.text


async def delivery(db: asyncpg.Connection, id: str, group: str) -> asyncpg.Record:
    row = await db.fetchrow(
        "SELECT status, attempts, refusals, last_error FROM rmsg_delivery"
        " WHERE message_id = $1 AND group_name = $2",
        id,
        group,
    )
    assert row is not None
    return row


async def delete_queue(amqp: aio_pika.abc.AbstractConnection, name: str) -> None:
    """What an operator does with ``rabbitmqctl delete_queue``."""
    async with amqp.channel() as channel:
        await channel.queue_delete(name)


async def queue_exists(amqp: aio_pika.abc.AbstractConnection, name: str) -> bool:
    channel = await amqp.channel()
    try:
        await channel.declare_queue(name, passive=True)
    except aio_pika.exceptions.ChannelClosed:
        return False
    await channel.close()
    return True


async def break_topology(amqp: aio_pika.abc.AbstractConnection, settings: Settings) -> None:
    """Replace the topic exchange by a direct one of the same name: the service cannot
    declare its topology again while it is there, so refusals last."""
    async with amqp.channel() as channel:
        await channel.exchange_delete(settings.exchange)
        await channel.declare_exchange(settings.exchange, ExchangeType.DIRECT, durable=True)


async def repair_topology(amqp: aio_pika.abc.AbstractConnection, settings: Settings) -> None:
    async with amqp.channel() as channel:
        await channel.exchange_delete(settings.exchange)
    await declare_topology(amqp, settings)


def warnings_naming(caplog: pytest.LogCaptureFixture, *ids: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and all(id in r.getMessage() for id in ids)
    ]


async def test_a_redelivery_to_a_deleted_group_queue_is_counted_and_the_queue_comes_back(
    client: httpx.AsyncClient,
    runtime: Runtime,
    settings: Settings,
    db: asyncpg.Connection,
    amqp: aio_pika.abc.AbstractConnection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="reliable_msg")
    await send(client, "wms-1")
    await ack(client, "wms-1", "inventory")
    await ack(client, "wms-1", "credit")
    wms = settings.queue_name("wms")
    await delete_queue(amqp, wms)
    before = refusals()

    async def refused() -> bool:
        await runtime.redelivery.run_once()
        return bool((await delivery(db, "wms-1", "wms"))["refusals"] == 1)

    await wait_until(refused, within=10, every=0.05)
    assert refusals() == before + 1
    [line] = warnings_naming(caplog, "(wms-1 to wms)", wms)
    assert "refused" in line
    row = await delivery(db, "wms-1", "wms")
    assert (row["status"], row["attempts"]) == ("sent", 1)
    assert wms in row["last_error"]

    # The service declared its topology again: the next redelivery is taken.
    await wait_until(lambda: queue_exists(amqp, wms), within=10)

    async def redelivered() -> bool:
        await runtime.redelivery.run_once()
        return bool((await delivery(db, "wms-1", "wms"))["attempts"] == 2)

    await wait_until(redelivered, within=10, every=0.05)
    assert (await delivery(db, "wms-1", "wms"))["refusals"] == 0
    [again] = await rabbit.drain(amqp, wms, wait=0.3)
    assert again.message_id == "wms-1" and again.headers["x-rmsg-attempt"] == 2
    assert runtime.publisher.failures == 0 and not runtime.publisher.degraded


async def test_a_redelivery_refused_max_refusals_times_goes_dead_and_requeue_revives_it(
    client: httpx.AsyncClient,
    runtime: Runtime,
    settings: Settings,
    db: asyncpg.Connection,
    amqp: aio_pika.abc.AbstractConnection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="reliable_msg")
    # Confirmed together, their deliveries fall due together: each pass refuses both.
    for id in ("m1", "m2"):
        body = {"id": id, "topic": "order.paid", "payload": {"n": 1}}
        r = await client.post("/v1/messages", json=body, headers=auth(PRODUCER))
        assert r.status_code == 201, r.text
    r = await client.post("/v1/batch/confirm", json={"ids": ["m1", "m2"]}, headers=auth(PRODUCER))
    assert [i["status"] for i in r.json()["results"]] == ["sent", "sent"], r.text
    for id in ("m1", "m2"):
        await ack(client, id, "inventory")
        await ack(client, id, "credit")
    wms = settings.queue_name("wms")
    await rabbit.drain(amqp, wms, wait=0.2)
    await break_topology(amqp, settings)
    await delete_queue(amqp, wms)
    before = refusals()

    async def dead() -> bool:
        await runtime.redelivery.run_once()
        rows = [await delivery(db, id, "wms") for id in ("m1", "m2")]
        return all(r["status"] == "dead" for r in rows)

    await wait_until(dead, within=15, every=0.05)
    for id in ("m1", "m2"):
        row = await delivery(db, id, "wms")
        assert (row["attempts"], row["refusals"]) == (1, MAX_REFUSALS), id
        assert f"refused it {MAX_REFUSALS} times" in row["last_error"]
        assert wms in row["last_error"]
        message = await db.fetchrow("SELECT status, last_error FROM rmsg_message WHERE id = $1", id)
        assert message is not None and message["status"] == "dead"
    assert refusals() == before + 2 * MAX_REFUSALS
    # One warning a pass names both refused deliveries.
    assert len(warnings_naming(caplog, "(m1 to wms, m2 to wms)")) >= MAX_REFUSALS
    assert runtime.publisher.failures == 0 and not runtime.publisher.degraded

    await repair_topology(amqp, settings)
    r = await client.post("/v1/requeue", params={"group": "wms"}, headers=auth(ADMIN))
    assert r.status_code == 200, r.text
    assert r.json() == {"requeued": 2, "refused": []}
    got = await rabbit.drain(amqp, wms, wait=0.3)
    assert sorted(str(m.message_id) for m in got) == ["m1", "m2"]
    for id in ("m1", "m2"):
        row = await delivery(db, id, "wms")
        assert (row["status"], row["refusals"]) == ("sent", 0)


async def test_a_committed_message_the_broker_refuses_goes_dead_after_max_refusals(
    client: httpx.AsyncClient,
    runtime: Runtime,
    settings: Settings,
    db: asyncpg.Connection,
    amqp: aio_pika.abc.AbstractConnection,
    endpoint: tuple[ProducerEndpoint, int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Check-back answers committed while every publish of ``order.created`` (only
    ``credit`` subscribes) is refused: each confirm is counted, then it is dead."""
    caplog.set_level(logging.WARNING, logger="reliable_msg")
    producer, _ = endpoint
    producer.answers["c-1"] = "committed"
    await break_topology(amqp, settings)
    await delete_queue(amqp, settings.queue_name("credit"))
    body = {"id": "c-1", "topic": "order.created", "payload": {"n": 1}}
    r = await client.post("/v1/messages", json=body, headers=auth(PRODUCER))
    assert r.status_code == 201, r.text
    before = refusals()

    async def status() -> asyncpg.Record:
        row = await db.fetchrow(
            "SELECT status, refusals, last_error FROM rmsg_message WHERE id = 'c-1'"
        )
        assert row is not None
        return row

    async def dead() -> bool:
        await runtime.checkback.run_once()
        return bool((await status())["status"] == "dead")

    await wait_until(dead, within=20, every=0.05)
    row = await status()
    assert row["refusals"] == MAX_REFUSALS
    assert f"refused it {MAX_REFUSALS} times" in row["last_error"]
    assert producer.calls["c-1"] == MAX_REFUSALS
    assert refusals() == before + MAX_REFUSALS
    assert warnings_naming(caplog, "(c-1)", "refused")
    assert runtime.publisher.failures == 0 and not runtime.publisher.degraded

    # Repaired, a requeue asks the producer again, and this time the publish is taken.
    await repair_topology(amqp, settings)
    r = await client.post("/v1/messages/c-1/requeue", headers=auth(ADMIN))
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "pending"
    assert (await status())["refusals"] == 0

    async def sent() -> bool:
        await runtime.checkback.run_once()
        return bool((await status())["status"] == "sent")

    await wait_until(sent, within=20, every=0.05)
    [message] = await rabbit.drain(amqp, settings.queue_name("credit"), wait=0.3)
    assert message.message_id == "c-1"


async def test_rapid_producer_confirms_during_refusals_do_not_kill_the_message(
    client: httpx.AsyncClient,
    runtime: Runtime,
    settings: Settings,
    db: asyncpg.Connection,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    """An SDK's retries confirm many times within seconds during a topology gap: only
    check-back's paced confirms count toward ``max_refusals``, so the committed message
    stays ``pending`` for check-back instead of dying within seconds."""
    await break_topology(amqp, settings)
    await delete_queue(amqp, settings.queue_name("credit"))
    body = {"id": "c-2", "topic": "order.created", "payload": {"n": 1}}
    r = await client.post("/v1/messages", json=body, headers=auth(PRODUCER))
    assert r.status_code == 201, r.text
    for _ in range(4 * MAX_REFUSALS):
        r = await client.post("/v1/messages/c-2/confirm", headers=auth(PRODUCER))
        assert (r.status_code, r.json()["error"]["code"]) == (503, "unroutable"), r.text
    r = await client.post("/v1/batch/confirm", json={"ids": ["c-2"]}, headers=auth(PRODUCER))
    assert r.json()["results"][0]["error"]["code"] == "unroutable", r.text
    row = await db.fetchrow("SELECT status, refusals FROM rmsg_message WHERE id = 'c-2'")
    assert row is not None and (row["status"], row["refusals"]) == ("pending", 0)

    await repair_topology(amqp, settings)
    r = await client.post("/v1/messages/c-2/confirm", headers=auth(PRODUCER))
    assert r.status_code == 200 and r.json()["status"] == "sent", r.text
    [message] = await rabbit.drain(amqp, settings.queue_name("credit"), wait=0.3)
    assert message.message_id == "c-2"


def close_service_connection() -> None:
    """Have RabbitMQ close this process's ``reliable-msg`` connection, as a broker restart
    or a network cut would (the other test runs' connections are left alone)."""
    ours = subprocess.run(
        ["ss", "-tnpH", "state", "established", "( dport = :5672 )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    ports = {
        line.split()[2].rsplit(":", 1)[1]
        for line in ours.splitlines()
        if f"pid={os.getpid()}," in line
    }
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "peer_port", "client_properties"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    closed = 0
    for line in listed.splitlines():
        pid, port, properties = line.split("\t")
        if port in ports and '"reliable-msg"' in properties:
            subprocess.run(
                ["rabbitmqctl", "-q", "close_connection", pid, "test: connection cut"],
                check=True,
                capture_output=True,
                timeout=60,
            )
            closed += 1
    assert closed == 1, listed


async def test_the_topology_is_declared_again_when_the_connection_comes_back(
    runtime: Runtime, settings: Settings, amqp: aio_pika.abc.AbstractConnection
) -> None:
    """A queue deleted while the service was cut off is back once it reconnects, before
    any publish is refused for it."""
    wms = settings.queue_name("wms")
    await delete_queue(amqp, wms)
    close_service_connection()
    await wait_until(lambda: queue_exists(amqp, wms), within=15)
    assert runtime.publisher.connected
