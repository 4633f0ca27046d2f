"""A bulk requeue takes what the broker takes, page after page: a delivery the broker
refuses (its header over ``frame_max``, or no queue for it) stays ``dead`` with the
reason, is answered under ``refused``, and neither blocks the rest nor is published."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aio_pika
import asyncpg
import httpx
import pytest

from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from tests.conftest import ADMIN, auth
from tests.helpers import rabbit
from tests.helpers.service import write_config
from tests.test_refusals import break_topology, delete_queue, repair_topology
from tests.test_requeue_bulk import MAX_ATTEMPTS, _kill, _send

#: Far over RabbitMQ's frame_max (128 KiB by default).
HUGE = "h" * 200_000


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(
        scanner={"interval": 0.1, "batch": 2},
        redelivery={"ack_timeout": 0.3, "jitter": 0.0, "max_attempts": MAX_ATTEMPTS},
    )


async def _deliveries(db: asyncpg.Connection, group: str) -> dict[str, asyncpg.Record]:
    rows = await db.fetch(
        "SELECT message_id, status, last_error FROM rmsg_delivery WHERE group_name = $1", group
    )
    return {r["message_id"]: r for r in rows}


async def _message(db: asyncpg.Connection, id: str) -> asyncpg.Record:
    row = await db.fetchrow("SELECT status, last_error FROM rmsg_message WHERE id = $1", id)
    assert row is not None
    return row


async def _drain_all(settings: Settings, amqp: aio_pika.abc.AbstractConnection) -> None:
    for group in settings.groups:
        await rabbit.drain(amqp, settings.queue_name(group), wait=0.2)


async def _queued(
    settings: Settings, amqp: aio_pika.abc.AbstractConnection, group: str
) -> list[str]:
    got = await rabbit.drain(amqp, settings.queue_name(group), wait=0.3)
    return sorted(str(m.message_id) for m in got)


async def test_bulk_requeue_goes_past_an_unpublishable_message_in_its_page(
    service_url: str,
    runtime: Runtime,
    settings: Settings,
    db: asyncpg.Connection,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    bad, good = "a-huge", ["b-1", "b-2", "b-3"]
    async with httpx.AsyncClient(base_url=service_url) as http:
        for id in [bad, *good]:
            await _send(http, id)
        await _kill(runtime, db, [bad, *good], "wms")
        # Its stored header outgrew frame_max while it was dead; it sorts first.
        await db.execute(
            "UPDATE rmsg_message SET headers = $2::jsonb WHERE id = $1",
            bad,
            json.dumps({"b": HUGE}),
        )
        await _drain_all(settings, amqp)
        r = await http.post("/v1/requeue", params={"group": "wms"}, headers=auth(ADMIN))
        assert r.status_code == 200, r.text
        assert r.json() == {"requeued": len(good), "refused": [bad]}

    assert await _queued(settings, amqp, "wms") == good
    wms = await _deliveries(db, "wms")
    assert {id: wms[id]["status"] for id in good} == dict.fromkeys(good, "sent")
    assert wms[bad]["status"] == "dead" and "frame_max" in wms[bad]["last_error"]
    message = await _message(db, bad)
    assert message["status"] == "dead" and "frame_max" in message["last_error"]
    for id in good:
        assert (await _message(db, id))["status"] == "sent"
    assert runtime.publisher.connected and not runtime.publisher.degraded


async def test_bulk_requeue_goes_past_an_unroutable_delivery_and_publishes_only_the_taken(
    service_url: str,
    runtime: Runtime,
    settings: Settings,
    db: asyncpg.Connection,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    """wms's queue is gone for good (the topology cannot be declared again): a message
    dead in wms and inventory gets its inventory delivery back, and only that."""
    both, wms_only, inventory_only = "a-both", "a-wms", ["b-1", "b-2", "b-3"]
    async with httpx.AsyncClient(base_url=service_url) as http:
        for id in [both, wms_only, *inventory_only]:
            await _send(http, id)
        await _kill(runtime, db, [both, wms_only], "wms")
        await _kill(runtime, db, [both, *inventory_only], "inventory")
        await _drain_all(settings, amqp)
        await break_topology(amqp, settings)
        await delete_queue(amqp, settings.queue_name("wms"))
        try:
            r = await http.post("/v1/requeue", params={"topic": "order.paid"}, headers=auth(ADMIN))
            assert r.status_code == 200, r.text
            assert r.json() == {"requeued": 1 + len(inventory_only), "refused": [both, wms_only]}
            assert await _queued(settings, amqp, "inventory") == sorted([both, *inventory_only])
            assert await _queued(settings, amqp, "credit") == []
        finally:
            await repair_topology(amqp, settings)

    inventory = await _deliveries(db, "inventory")
    assert {id: inventory[id]["status"] for id in [both, *inventory_only]} == dict.fromkeys(
        [both, *inventory_only], "sent"
    )
    wms = await _deliveries(db, "wms")
    for id in (both, wms_only):
        assert wms[id]["status"] == "dead"
        assert settings.queue_name("wms") in wms[id]["last_error"]
        message = await _message(db, id)
        assert message["status"] == "dead"
        assert settings.queue_name("wms") in message["last_error"]
    for id in inventory_only:
        assert (await _message(db, id))["status"] == "sent"


async def test_single_requeue_keeps_the_refused_delivery_dead_and_sends_the_taken_one(
    service_url: str,
    runtime: Runtime,
    settings: Settings,
    db: asyncpg.Connection,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    """Dead in wms and inventory, wms's queue gone for good: the requeue answers 503
    unroutable, and the inventory delivery it published is ``sent``, not ``dead``."""
    async with httpx.AsyncClient(base_url=service_url) as http:
        await _send(http, "one")
        await _kill(runtime, db, ["one"], "wms")
        await _kill(runtime, db, ["one"], "inventory")
        await _drain_all(settings, amqp)
        await break_topology(amqp, settings)
        await delete_queue(amqp, settings.queue_name("wms"))
        try:
            r = await http.post("/v1/messages/one/requeue", headers=auth(ADMIN))
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "unroutable"
            assert await _queued(settings, amqp, "inventory") == ["one"]
        finally:
            await repair_topology(amqp, settings)
    assert (await _deliveries(db, "inventory"))["one"]["status"] == "sent"
    wms = (await _deliveries(db, "wms"))["one"]
    assert wms["status"] == "dead" and settings.queue_name("wms") in wms["last_error"]
    assert (await _message(db, "one"))["status"] == "dead"
    assert "stays dead" in r.json()["error"]["message"]


async def test_cli_group_requeue_names_what_the_broker_refused(
    service_url: str,
    runtime: Runtime,
    settings: Settings,
    db: asyncpg.Connection,
    amqp: aio_pika.abc.AbstractConnection,
    tmp_path: Path,
) -> None:
    async with httpx.AsyncClient(base_url=service_url) as http:
        for id in ("a-huge", "b-1"):
            await _send(http, id)
    await _kill(runtime, db, ["a-huge", "b-1"], "wms")
    await db.execute(
        "UPDATE rmsg_message SET headers = $1::jsonb WHERE id = 'a-huge'",
        json.dumps({"b": HUGE}),
    )
    await _drain_all(settings, amqp)
    config = write_config(settings, tmp_path / "config.toml")
    command = [sys.executable, "-m", "reliable_msg", "--config", str(config)]
    done = await asyncio.to_thread(
        subprocess.run,
        [*command, "requeue", "--group", "wms", "--yes"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    out = " ".join(done.stdout.split())
    assert "republished 1 dead deliveries of group wms; 1 message(s) requeued" in out
    assert "the broker refused 1 (they stay dead): a-huge" in out
    assert await _queued(settings, amqp, "wms") == ["b-1"]
