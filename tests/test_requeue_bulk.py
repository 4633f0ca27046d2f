"""Bulk requeue of a group goes through every dead delivery of it, batch after batch,
whatever else keeps a message ``dead`` and whoever holds a row for a moment."""

from __future__ import annotations

import asyncio
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
from tests.conftest import ADMIN, PRODUCER, auth
from tests.helpers import rabbit
from tests.helpers.service import write_config

MAX_ATTEMPTS = 2
BATCH = 2
#: Dead in wms and in inventory: requeuing wms leaves them ``dead`` (inventory's is).
BOTH = [f"rq-both-{i}" for i in range(5)]
#: Dead in wms only.
WMS_ONLY = [f"rq-wms-{i}" for i in range(3)]
#: Dead in inventory only: a wms requeue must not touch them.
INVENTORY_ONLY = [f"rq-inv-{i}" for i in range(2)]


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(
        scanner={"interval": 0.1, "batch": BATCH},
        redelivery={"ack_timeout": 0.3, "jitter": 0.0, "max_attempts": MAX_ATTEMPTS},
    )


async def _send(http: httpx.AsyncClient, id: str) -> None:
    body = {"id": id, "topic": "order.paid", "payload": {"id": id}}
    assert (await http.post("/v1/messages", json=body, headers=auth(PRODUCER))).is_success
    r = await http.post(f"/v1/messages/{id}/confirm", headers=auth(PRODUCER))
    assert r.status_code == 200, r.text


async def _kill(runtime: Runtime, db: asyncpg.Connection, ids: list[str], group: str) -> None:
    """The deliveries' last try goes unacked: the redelivery scanner makes them dead."""
    await db.execute(
        "UPDATE rmsg_delivery SET attempts = $1, next_attempt_at = now()"
        " WHERE group_name = $2 AND message_id = ANY($3::text[])",
        MAX_ATTEMPTS,
        group,
        ids,
    )
    while await runtime.redelivery.run_once():
        pass


async def _statuses(db: asyncpg.Connection, group: str) -> dict[str, str]:
    rows = await db.fetch(
        "SELECT message_id, status FROM rmsg_delivery WHERE group_name = $1", group
    )
    return {r["message_id"]: r["status"] for r in rows}


async def _dead_everywhere(
    http: httpx.AsyncClient, runtime: Runtime, db: asyncpg.Connection
) -> None:
    for id in BOTH + WMS_ONLY + INVENTORY_ONLY:
        await _send(http, id)
    await _kill(runtime, db, BOTH + WMS_ONLY, "wms")
    await _kill(runtime, db, BOTH + INVENTORY_ONLY, "inventory")
    dead = {id for id, s in (await _statuses(db, "wms")).items() if s == "dead"}
    assert dead == set(BOTH + WMS_ONLY)
    dead = {id for id, s in (await _statuses(db, "inventory")).items() if s == "dead"}
    assert dead == set(BOTH + INVENTORY_ONLY)


async def _drain(settings: Settings, amqp: aio_pika.abc.AbstractConnection) -> None:
    """Empty the queues of what the first publishes and redeliveries left there."""
    for group in settings.groups:
        await rabbit.drain(amqp, settings.queue_name(group), wait=0.2)


async def _requeue_wms(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/requeue", params={"group": "wms"}, headers=auth(ADMIN))
    assert r.status_code == 200, r.text
    # Every message with a dead wms delivery had it republished.
    assert r.json() == {"requeued": len(BOTH + WMS_ONLY), "refused": []}


async def _only_wms_came_back(
    db: asyncpg.Connection, settings: Settings, amqp: aio_pika.abc.AbstractConnection
) -> None:
    assert set((await _statuses(db, "wms")).values()) == {"sent"}
    inventory = await _statuses(db, "inventory")
    assert {id for id, s in inventory.items() if s == "dead"} == set(BOTH + INVENTORY_ONLY)
    republished = await rabbit.drain(amqp, settings.queue_name("wms"), wait=0.3)
    assert sorted(m.message_id or "" for m in republished) == sorted(BOTH + WMS_ONLY)
    for group in ("inventory", "credit"):
        assert await rabbit.drain(amqp, settings.queue_name(group), wait=0.2) == []
    rows = await db.fetch("SELECT id, status FROM rmsg_message")
    status = {r["id"]: r["status"] for r in rows}
    assert {id for id, s in status.items() if s == "dead"} == set(BOTH + INVENTORY_ONLY)
    assert {status[id] for id in WMS_ONLY} == {"sent"}


async def test_group_requeue_goes_past_messages_another_group_keeps_dead(
    service_url: str,
    runtime: Runtime,
    settings: Settings,
    db: asyncpg.Connection,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    async with httpx.AsyncClient(base_url=service_url) as http:
        await _dead_everywhere(http, runtime, db)
        await _drain(settings, amqp)
        await _requeue_wms(http)
    await _only_wms_came_back(db, settings, amqp)


async def test_group_requeue_waits_for_a_row_another_transaction_holds(
    service_url: str,
    runtime: Runtime,
    settings: Settings,
    db: asyncpg.Connection,
    database_url: str,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    async with httpx.AsyncClient(base_url=service_url) as http:
        await _dead_everywhere(http, runtime, db)
        await _drain(settings, amqp)
        holder = await asyncpg.connect(database_url)
        try:
            held = holder.transaction()
            await held.start()
            # A dead wms message in the middle of the first batch, locked for a moment.
            await holder.execute("SELECT 1 FROM rmsg_message WHERE id = $1 FOR UPDATE", BOTH[1])

            async def release() -> None:
                await asyncio.sleep(0.5)
                await held.rollback()

            releasing = asyncio.create_task(release())
            await _requeue_wms(http)
            await releasing
        finally:
            await holder.close()
    await _only_wms_came_back(db, settings, amqp)


async def test_cli_group_requeue_takes_the_same_path(
    service_url: str,
    runtime: Runtime,
    settings: Settings,
    db: asyncpg.Connection,
    amqp: aio_pika.abc.AbstractConnection,
    tmp_path: Path,
) -> None:
    async with httpx.AsyncClient(base_url=service_url) as http:
        await _dead_everywhere(http, runtime, db)
    await _drain(settings, amqp)
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
    n = len(BOTH + WMS_ONLY)
    assert f"republished {n} dead deliveries of group wms; {n} message(s) requeued" in done.stdout
    await _only_wms_came_back(db, settings, amqp)
