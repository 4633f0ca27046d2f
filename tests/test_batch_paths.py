"""Batch confirm and batch ack on their unhappy paths, against the real services: each
item gets its own answer, and the others go through."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest

from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from tests.conftest import GROUP_TOKENS, PRODUCER, auth
from tests.helpers import rabbit
from tests.helpers.waiting import wait_until

INVENTORY = GROUP_TOKENS["inventory"]


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    # Check-back (to a port nobody listens on) gives up after one try; a delivery to
    # inventory dies after its first redelivery would be due.
    return make_settings(
        checkback={"max_tries": 1},
        groups={
            "inventory": {"topics": ["order.paid"], "token": INVENTORY, "max_attempts": 1},
            "credit": {"topics": ["order.*"], "token": GROUP_TOKENS["credit"]},
            "wms": {"topics": ["order.paid"], "token": GROUP_TOKENS["wms"]},
        },
    )


async def prepare(client: httpx.AsyncClient, id: str, topic: str = "order.paid") -> None:
    body = {"id": id, "topic": topic, "payload": {"n": 1}}
    r = await client.post("/v1/messages", json=body, headers=auth(PRODUCER))
    assert r.status_code == 201, r.text


async def confirm(client: httpx.AsyncClient, id: str) -> None:
    r = await client.post(f"/v1/messages/{id}/confirm", headers=auth(PRODUCER))
    assert r.status_code == 200, r.text


def outcome(item: dict[str, Any]) -> tuple[str, bool, str | None]:
    """An item as (id, ok, status or error code)."""
    if item["ok"]:
        assert item["error"] is None, item
        return item["id"], True, item["status"]
    assert item["status"] is None and item["error"]["message"], item
    return item["id"], False, item["error"]["code"]


async def statuses(db: asyncpg.Connection) -> dict[str, str]:
    rows = await db.fetch("SELECT id, status FROM rmsg_message")
    return {r["id"]: r["status"] for r in rows}


async def test_batch_confirm_answers_a_refused_a_cancelled_and_a_dead_item_on_their_own(
    client: httpx.AsyncClient,
    runtime: Runtime,
    settings: Settings,
    db: asyncpg.Connection,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    await prepare(client, "dead")

    async def dead() -> bool:
        await runtime.checkback.run_once()
        return (await statuses(db))["dead"] == "dead"

    await wait_until(dead, within=15, every=0.1)
    await prepare(client, "ok-1")
    await prepare(client, "refused", topic="order.created")  # only credit subscribes
    await prepare(client, "cancelled")
    await prepare(client, "ok-2")
    r = await client.post("/v1/messages/cancelled/cancel", headers=auth(PRODUCER))
    assert r.status_code == 200, r.text
    # An operator deletes credit's queue: no queue takes order.created.
    async with amqp.channel() as channel:
        await channel.queue_delete(settings.queue_name("credit"))

    ids = ["ok-1", "refused", "cancelled", "dead", "ok-2"]
    r = await client.post("/v1/batch/confirm", json={"ids": ids}, headers=auth(PRODUCER))
    assert r.status_code == 200, r.text
    assert [outcome(i) for i in r.json()["results"]] == [
        ("ok-1", True, "sent"),
        ("refused", False, "unroutable"),
        ("cancelled", False, "cancelled"),
        ("dead", False, "dead"),
        ("ok-2", True, "sent"),
    ]
    assert await statuses(db) == {
        "ok-1": "sent",
        "refused": "pending",
        "cancelled": "cancelled",
        "dead": "dead",
        "ok-2": "sent",
    }
    got = await rabbit.drain(amqp, settings.queue_name("inventory"), wait=0.3)
    assert sorted(str(m.message_id) for m in got) == ["ok-1", "ok-2"]
    deliveries = await db.fetch("SELECT DISTINCT message_id FROM rmsg_delivery")
    assert sorted(d["message_id"] for d in deliveries) == ["ok-1", "ok-2"]


async def test_batch_ack_answers_a_dead_delivery_a_repeat_and_an_unknown_id_on_their_own(
    client: httpx.AsyncClient, runtime: Runtime, db: asyncpg.Connection
) -> None:
    await prepare(client, "dead")
    await confirm(client, "dead")

    async def delivery_dead() -> bool:
        await runtime.redelivery.run_once()
        status = await db.fetchval(
            "SELECT status FROM rmsg_delivery WHERE message_id = 'dead' AND group_name = $1",
            "inventory",
        )
        return bool(status == "dead")

    await wait_until(delivery_dead, within=15, every=0.05)
    for id in ("a-1", "a-2"):
        await prepare(client, id)
        await confirm(client, id)
    r = await client.post("/v1/messages/a-2/ack", headers=auth(INVENTORY))
    assert r.status_code == 200, r.text

    ids = ["a-1", "dead", "a-2", "nope"]
    expected = [
        ("a-1", True, "done"),
        ("dead", False, "delivery_dead"),
        ("a-2", True, "done"),
        ("nope", False, "not_found"),
    ]
    repeats = []
    for _ in range(2):  # the same batch again answers the same
        r = await client.post("/v1/batch/ack", json={"ids": ids}, headers=auth(INVENTORY))
        assert r.status_code == 200, r.text
        assert [outcome(i) for i in r.json()["results"]] == expected
        repeats.append([i["id"] for i in r.json()["results"] if i.get("done_at")])
    # done_at says a repeat (done before this ack), and when: a-2 then, a-1 the second time.
    assert repeats == [["a-2"], ["a-1", "a-2"]]
    done_at = await db.fetchval(
        "SELECT done_at FROM rmsg_delivery WHERE message_id = 'a-2' AND group_name = 'inventory'"
    )
    assert datetime.fromisoformat(r.json()["results"][2]["done_at"]) == done_at
    rows = await db.fetch(
        "SELECT message_id, status FROM rmsg_delivery WHERE group_name = 'inventory'"
    )
    assert {r["message_id"]: r["status"] for r in rows} == {
        "a-1": "done",
        "a-2": "done",
        "dead": "dead",
    }
    # Repeated acks are no new moves: each history shows inventory's ack once.
    for id in ("a-1", "a-2"):
        moves = await runtime.usecases.history(id)
        acks = [t for t in moves if (t.group_name, t.to_status) == ("inventory", "done")]
        assert len(acks) == 1, moves
