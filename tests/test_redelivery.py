"""Redelivery of unacked deliveries: per group, with growing delays, then dead; requeue."""

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
from tests.conftest import ADMIN, GROUP_TOKENS, PRODUCER, auth
from tests.helpers import rabbit
from tests.helpers.waiting import wait_until

ACK_TIMEOUT = 0.3
MAX_ATTEMPTS = 4


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(
        redelivery={
            "ack_timeout": ACK_TIMEOUT,
            "backoff_factor": 2.0,
            "backoff_cap": 1.0,
            "jitter": 0.0,
            "max_attempts": MAX_ATTEMPTS,
        }
    )


async def send(client: httpx.AsyncClient, id: str) -> None:
    body = {"id": id, "topic": "order.paid", "payload": {"n": 1}}
    assert (await client.post("/v1/messages", json=body, headers=auth(PRODUCER))).is_success
    r = await client.post(f"/v1/messages/{id}/confirm", headers=auth(PRODUCER))
    assert r.status_code == 200, r.text


async def ack(client: httpx.AsyncClient, id: str, group: str) -> None:
    r = await client.post(f"/v1/messages/{id}/ack", headers=auth(GROUP_TOKENS[group]))
    assert r.status_code == 200, r.text


async def test_unacked_delivery_is_redelivered_to_its_group_only_then_dead_then_requeued(
    client: httpx.AsyncClient,
    runtime: Runtime,
    settings: Settings,
    amqp: aio_pika.abc.AbstractConnection,
    db: asyncpg.Connection,
) -> None:
    await send(client, "slow")
    await ack(client, "slow", "inventory")
    await ack(client, "slow", "wms")

    delays: list[float] = []

    async def credit_state() -> asyncpg.Record:
        row = await db.fetchrow(
            "SELECT status, attempts, extract(epoch FROM next_attempt_at - updated_at) AS gap"
            " FROM rmsg_delivery WHERE message_id = 'slow' AND group_name = 'credit'"
        )
        assert row is not None
        return row

    async def dead() -> bool:
        before = await credit_state()
        await runtime.redelivery.run_once()
        after = await credit_state()
        if after["attempts"] != before["attempts"] and after["status"] == "sent":
            delays.append(float(after["gap"]))
        return bool(after["status"] == "dead")

    await wait_until(dead, within=30, every=0.05)

    # Attempts 2, 3 and 4 were redeliveries, each waiting longer (capped at 1 s).
    assert delays == pytest.approx([0.3, 0.6, 1.0])
    message = await db.fetchrow("SELECT status, last_error FROM rmsg_message WHERE id = 'slow'")
    assert message is not None
    assert message["status"] == "dead"
    assert "credit" in message["last_error"]

    credit = await rabbit.drain(amqp, settings.queue_name("credit"), wait=0.3)
    assert [m.headers["x-rmsg-attempt"] for m in credit] == [1, 2, 3, 4]
    for group in ("inventory", "wms"):
        others = await rabbit.drain(amqp, settings.queue_name(group), wait=0.2)
        assert [m.headers["x-rmsg-attempt"] for m in others] == [1], group

    # An ack arriving for a dead delivery is refused: only a requeue brings it back.
    late = await client.post("/v1/messages/slow/ack", headers=auth(GROUP_TOKENS["credit"]))
    assert late.status_code == 409
    assert late.json()["error"]["code"] == "delivery_dead"

    r = await client.post("/v1/messages/slow/requeue", headers=auth(ADMIN))
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "sent"
    [again] = await rabbit.drain(amqp, settings.queue_name("credit"), wait=0.3)
    assert again.message_id == "slow"
    assert again.headers["x-rmsg-attempt"] == 1
    for group in ("inventory", "wms"):
        assert await rabbit.drain(amqp, settings.queue_name(group), wait=0.2) == []

    await ack(client, "slow", "credit")
    assert await db.fetchval("SELECT status FROM rmsg_message WHERE id = 'slow'") == "done"


def delivery_fields(deliveries: list[dict[str, Any]]) -> dict[str, tuple[Any, ...]]:
    """Each delivery of a ``GET /v1/messages/{id}`` answer by group, its times parsed."""

    def at(value: str | None) -> datetime | None:
        return None if value is None else datetime.fromisoformat(value)

    return {
        d["group"]: (
            d["status"],
            d["attempts"],
            at(d["next_attempt_at"]),
            d["last_error"],
            at(d["updated_at"]),
            at(d["done_at"]),
        )
        for d in deliveries
    }


async def stored_deliveries(db: asyncpg.Connection, id: str) -> dict[str, tuple[Any, ...]]:
    """The rows as the API shows them: a next try only while a delivery waits for one."""
    rows = await db.fetch(
        "SELECT group_name, status, attempts,"
        " CASE WHEN status = 'sent' THEN next_attempt_at END, last_error, updated_at, done_at"
        " FROM rmsg_delivery WHERE message_id = $1",
        id,
    )
    return {r["group_name"]: tuple(r)[1:] for r in rows}


async def test_get_shows_each_delivery_after_a_redelivery_and_a_death(
    client: httpx.AsyncClient, runtime: Runtime, db: asyncpg.Connection
) -> None:
    await send(client, "seen")
    await ack(client, "seen", "inventory")
    # credit's delivery falls due and is redelivered; wms's is not due yet.
    await db.execute(
        "UPDATE rmsg_delivery SET next_attempt_at = now()"
        " WHERE message_id = 'seen' AND group_name = 'credit'"
    )
    assert await runtime.redelivery.run_once() == 1

    r = await client.get("/v1/messages/seen", headers=auth(PRODUCER))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "sent"
    assert len(body["deliveries"]) == 3
    shown = delivery_fields(body["deliveries"])
    assert shown == await stored_deliveries(db, "seen")
    assert {g: shown[g][:2] for g in shown} == {
        "inventory": ("done", 1),
        "credit": ("sent", 2),
        "wms": ("sent", 1),
    }
    assert all(shown[g][3] is None for g in shown), "no delivery failed yet"
    assert shown["inventory"][2] is None and shown["inventory"][5] is not None  # done
    assert shown["credit"][5] is None
    _, _, next_try, _, updated, _ = shown["credit"]
    assert (next_try - updated).total_seconds() == pytest.approx(ACK_TIMEOUT)

    # credit's last delivery goes unacked: dead, and the reason shows on the delivery.
    await db.execute(
        "UPDATE rmsg_delivery SET attempts = $1, next_attempt_at = now()"
        " WHERE message_id = 'seen' AND group_name = 'credit'",
        MAX_ATTEMPTS,
    )
    assert await runtime.redelivery.run_once() == 1
    r = await client.get("/v1/messages/seen", headers=auth(ADMIN))
    assert r.status_code == 200, r.text
    body = r.json()
    shown = delivery_fields(body["deliveries"])
    assert shown == await stored_deliveries(db, "seen")
    status, attempts, _, error, _, _ = shown["credit"]
    assert (status, attempts) == ("dead", MAX_ATTEMPTS)
    assert error == f"not acked by credit after {MAX_ATTEMPTS} deliveries"
    assert (body["status"], body["last_error"]) == ("dead", error)
    assert shown["wms"][:2] == ("sent", 1)


async def test_bulk_requeue_of_a_group(
    client: httpx.AsyncClient,
    runtime: Runtime,
    settings: Settings,
    db: asyncpg.Connection,
) -> None:
    ids = [f"b-{i}" for i in range(5)]
    for id in ids:
        await send(client, id)
    await db.execute(
        "UPDATE rmsg_delivery SET attempts = $1, next_attempt_at = now() WHERE group_name = 'wms'",
        MAX_ATTEMPTS,
    )
    await runtime.redelivery.run_once()
    dead = await db.fetchval("SELECT count(*) FROM rmsg_message WHERE status = 'dead'")
    assert dead == len(ids)

    r = await client.post("/v1/requeue", params={"group": "wms"}, headers=auth(ADMIN))
    assert r.status_code == 200, r.text
    assert r.json() == {"requeued": len(ids), "refused": []}
    rows = await db.fetch("SELECT DISTINCT status FROM rmsg_delivery WHERE group_name = 'wms'")
    assert [r["status"] for r in rows] == ["sent"]
    assert await db.fetchval("SELECT count(*) FROM rmsg_message WHERE status = 'sent'") == len(ids)


async def test_redelivery_while_rabbitmq_is_down_does_not_spend_attempts(
    client: httpx.AsyncClient,
    runtime: Runtime,
    db: asyncpg.Connection,
) -> None:
    await send(client, "outage")
    await db.execute("UPDATE rmsg_delivery SET next_attempt_at = now()")
    with rabbit.stopped():
        await wait_until(lambda: not runtime.publisher.connected, within=10)
        assert await runtime.redelivery.run_once() == 3
    rows = await db.fetch("SELECT attempts, status, last_error FROM rmsg_delivery")
    assert [(r["attempts"], r["status"]) for r in rows] == [(1, "sent")] * 3
    assert all(r["last_error"] for r in rows)
