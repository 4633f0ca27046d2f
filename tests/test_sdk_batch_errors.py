"""The producer SDK's batch path gets the same typed error for a batch item as the
single-message path gets for its HTTP status: a permanent refusal is raised as such, not
as a transient ``ServiceUnavailable`` (real HTTP server, PostgreSQL and RabbitMQ)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable

import aio_pika
import asyncpg
import httpx
import pytest

from reliable_msg.errors import Conflict, PayloadTooLarge
from reliable_msg.sdk import producer as producer_sdk
from reliable_msg.sdk.client import RetryPolicy
from reliable_msg.sdk.producer import Outgoing, Producer
from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from tests.conftest import PRODUCER, auth
from tests.helpers import tables
from tests.helpers.waiting import wait_until
from tests.test_refusals import break_topology, repair_topology

FAST = RetryPolicy(attempts=3, initial=0.05, max_wait=0.2, deadline=2.0)
#: Far over RabbitMQ's frame_max (128 KiB by default).
HUGE = "h" * 200_000


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(max_header_bytes=4096, scanner={"retention": 0.5})


@pytest.fixture
async def sdk_db(db: asyncpg.Connection) -> asyncpg.Connection:
    await producer_sdk.install(db)
    await tables.empty(db, "rmsg_producer_marker")
    return db


@pytest.fixture
async def producer(service_url: str) -> AsyncIterator[Producer]:
    async with Producer(service_url, PRODUCER, retry=FAST) as p:
        yield p


def outgoing(id: str, **headers: str) -> Outgoing:
    return Outgoing("order.paid", {"id": id}, None, dict(headers), id)


async def statuses(db: asyncpg.Connection, *ids: str) -> dict[str, str]:
    rows = await db.fetch("SELECT id, status FROM rmsg_message WHERE id = ANY($1::text[])", ids)
    return {r["id"]: r["status"] for r in rows}


async def test_an_item_over_the_header_limit_raises_payload_too_large(
    producer: Producer, pool: asyncpg.Pool, sdk_db: asyncpg.Connection
) -> None:
    ran = False
    with pytest.raises(PayloadTooLarge) as raised:
        async with pool.acquire() as conn:
            async with producer.transaction_many(
                conn, [outgoing("h-1"), outgoing("h-2", b="x" * 8000)]
            ):
                ran = True
    assert raised.value.code == "headers_too_large"
    assert "4096" in raised.value.message
    assert not ran
    assert await statuses(sdk_db, "h-1", "h-2") == {"h-1": "cancelled"}


async def test_an_item_with_a_purged_id_raises_conflict_id_reused(
    runtime: Runtime,
    service_url: str,
    producer: Producer,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
) -> None:
    async with httpx.AsyncClient(base_url=service_url) as http:
        body = {"id": "r-1", "topic": "order.paid", "payload": {"n": 1}}
        assert (await http.post("/v1/messages", json=body, headers=auth(PRODUCER))).is_success
        r = await http.post("/v1/messages/r-1/cancel", headers=auth(PRODUCER))
        assert r.status_code == 200, r.text

    async def purged() -> bool:
        await runtime.purger.run_once()
        return not await statuses(sdk_db, "r-1")

    await wait_until(purged, within=10, every=0.2)
    ran = False
    with pytest.raises(Conflict) as raised:
        async with pool.acquire() as conn:
            async with producer.transaction_many(conn, [outgoing("r-2"), outgoing("r-1")]):
                ran = True
    assert raised.value.code == "id_reused"
    assert not ran
    assert await statuses(sdk_db, "r-1", "r-2") == {"r-2": "cancelled"}


async def test_a_dead_item_of_a_confirm_is_raised_even_after_a_transient_one(
    producer: Producer,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
    settings: Settings,
    amqp: aio_pika.abc.AbstractConnection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first item of the confirm is refused for now (no queue takes it: check-back
    will send it); the second can never be published (its stored header outgrew
    frame_max) and is dead: the caller is told so, not that check-back will send it."""
    caplog.set_level(logging.WARNING, logger="reliable_msg")
    await break_topology(amqp, settings)
    try:
        with pytest.raises(Conflict) as raised:
            async with pool.acquire() as conn:
                async with producer.transaction_many(conn, [outgoing("u-1"), outgoing("u-2")]):
                    await sdk_db.execute(
                        "UPDATE rmsg_message SET headers = $1::jsonb WHERE id = 'u-2'",
                        json.dumps({"b": HUGE}),
                    )
    finally:
        await repair_topology(amqp, settings)
    assert raised.value.code == "dead"
    assert "u-2" in raised.value.message and "frame_max" in raised.value.message
    assert await statuses(sdk_db, "u-1", "u-2") == {"u-1": "pending", "u-2": "dead"}
    [warning] = [r.getMessage() for r in caplog.records if "check-back will" in r.getMessage()]
    assert "u-1" in warning and "u-2" not in warning
