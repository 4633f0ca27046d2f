"""The producer SDK's batch path (``transaction_many``) when something goes wrong, over a
real HTTP server, PostgreSQL and RabbitMQ: a confirm that cannot reach the service, a
local commit that fails, and a retry whose batch prepare refuses one item."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest
from fastapi import FastAPI

from reliable_msg.errors import Conflict
from reliable_msg.harness.ports import free_port
from reliable_msg.harness.proxy import FaultProxy
from reliable_msg.sdk import producer as producer_sdk
from reliable_msg.sdk.client import RetryPolicy
from reliable_msg.sdk.consumer import Consumer
from reliable_msg.sdk.producer import Outgoing, Producer, check_back_router
from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from tests.conftest import PRODUCER
from tests.helpers.consumers import inventory_consumer, running_effects
from tests.helpers.servers import serving_app
from tests.helpers.waiting import wait_until

FAST = RetryPolicy(attempts=3, initial=0.05, max_wait=0.2, deadline=2.0)


@pytest.fixture
def check_port() -> int:
    return free_port()


@pytest.fixture
def settings(make_settings: Callable[..., Settings], check_port: int) -> Settings:
    url = f"http://127.0.0.1:{check_port}/rmsg/check-back"
    return make_settings(producers={"order": {"check_url": url, "token": PRODUCER}})


@pytest.fixture
async def proxy(service_url: str) -> AsyncIterator[FaultProxy]:
    """A fault proxy in front of the service's HTTP port."""
    port = int(service_url.rsplit(":", 1)[1])
    async with FaultProxy("127.0.0.1", port) as p:
        yield p


async def statuses(db: asyncpg.Connection, ids: list[str]) -> dict[str, str]:
    rows = await db.fetch("SELECT id, status FROM rmsg_message WHERE id = ANY($1::text[])", ids)
    return {r["id"]: r["status"] for r in rows}


async def check_back_until(
    runtime: Runtime, pool: asyncpg.Pool, db: asyncpg.Connection, want: dict[str, str]
) -> None:
    """Serve the producer's check-back and run passes until the messages reach ``want``."""
    app = FastAPI()
    app.include_router(check_back_router(pool, PRODUCER))
    port = runtime.settings.producers["order"].check_url.port
    async with serving_app(app, port=port):

        async def reached() -> bool:
            await runtime.checkback.run_once()
            return await statuses(db, list(want)) == want

        await wait_until(reached, within=15, every=0.3)


async def committed_not_confirmed(
    proxy: FaultProxy, pool: asyncpg.Pool, messages: list[Outgoing]
) -> producer_sdk.Sent:
    """An attempt that commits its local transaction while the service became unreachable."""
    async with Producer(proxy.url("http"), PRODUCER, retry=FAST) as producer:
        async with pool.acquire() as conn:
            async with producer.transaction_many(conn, messages) as sent:
                await conn.execute("INSERT INTO sdk_orders (id) VALUES ($1)", messages[0].id)
                await proxy.down()
    await proxy.up()
    return sent


async def delivered_once(
    service_url: str, settings: Settings, pool: asyncpg.Pool, db: asyncpg.Connection, ids: list[str]
) -> None:
    consumer = inventory_consumer(service_url, settings, pool, FAST, Consumer)
    async with running_effects(consumer):

        async def all_done() -> bool:
            done = await db.fetchval(
                "SELECT count(*) FROM rmsg_delivery WHERE message_id = ANY($1::text[])"
                " AND group_name = 'inventory' AND status = 'done'",
                ids,
            )
            return bool(done == len(ids))

        await wait_until(all_done, within=15)
    rows = await db.fetch("SELECT message_id FROM sdk_effects")
    assert sorted(r["message_id"] for r in rows) == sorted(ids)


async def test_confirm_unreachable_is_not_confirmed_and_check_back_delivers_the_batch(
    runtime: Runtime,
    service_url: str,
    settings: Settings,
    proxy: FaultProxy,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
) -> None:
    messages = [Outgoing("order.paid", {"n": n}, id=f"cu-{n}") for n in range(3)]
    ids = [m.id for m in messages]
    sent = await committed_not_confirmed(proxy, pool, messages)
    assert not sent.confirmed
    assert sent.ids == ids
    assert await statuses(sdk_db, ids) == dict.fromkeys(ids, "pending")

    await check_back_until(runtime, pool, sdk_db, dict.fromkeys(ids, "sent"))
    await delivered_once(service_url, settings, pool, sdk_db, ids)


async def test_retry_whose_batch_prepare_refuses_one_item_cancels_only_what_it_created(
    runtime: Runtime,
    service_url: str,
    settings: Settings,
    proxy: FaultProxy,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
) -> None:
    """The earlier attempt committed a and b; the retry repeats a, changes b's body (409
    id_conflict) and adds c. Only c, which the retry created, may be cancelled: a and b
    are committed business data, and check-back delivers them."""
    first = [Outgoing("order.paid", {"n": n}, id=id) for n, id in enumerate(["rt-a", "rt-b"])]
    assert not (await committed_not_confirmed(proxy, pool, first)).confirmed

    retry = [
        first[0],
        Outgoing("order.paid", {"n": 1, "at": "later"}, id="rt-b"),
        Outgoing("order.paid", {"n": 2}, id="rt-c"),
    ]
    ran = False
    async with Producer(service_url, PRODUCER, retry=FAST) as producer:
        with pytest.raises(Conflict, match="another body"):
            async with pool.acquire() as conn:
                async with producer.transaction_many(conn, retry):
                    ran = True
    assert not ran
    assert await statuses(sdk_db, ["rt-a", "rt-b", "rt-c"]) == {
        "rt-a": "pending",
        "rt-b": "pending",
        "rt-c": "cancelled",
    }

    await check_back_until(runtime, pool, sdk_db, {"rt-a": "sent", "rt-b": "sent"})
    await delivered_once(service_url, settings, pool, sdk_db, ["rt-a", "rt-b"])


async def test_failed_local_commit_cancels_nothing_and_nothing_is_delivered(
    runtime: Runtime,
    service_url: str,
    settings: Settings,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
) -> None:
    """A COMMIT that fails (a deferred constraint) has an unknown outcome to the SDK: it
    cancels nothing, and check-back finds no marker and cancels the batch."""
    await sdk_db.execute(
        """
        DROP TABLE IF EXISTS sdk_deferred;
        CREATE TABLE sdk_deferred (
            id int PRIMARY KEY, parent int REFERENCES sdk_deferred DEFERRABLE INITIALLY DEFERRED
        );
        """
    )
    messages = [Outgoing("order.paid", {"n": n}, id=f"cf-{n}") for n in range(2)]
    ids = [m.id for m in messages]
    async with Producer(service_url, PRODUCER, retry=FAST) as producer:
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            async with pool.acquire() as conn:
                async with producer.transaction_many(conn, messages):
                    await conn.execute("INSERT INTO sdk_deferred VALUES (1, 99)")
    assert await statuses(sdk_db, ids) == dict.fromkeys(ids, "pending")
    assert await sdk_db.fetchval("SELECT count(*) FROM rmsg_producer_marker") == 0

    await check_back_until(runtime, pool, sdk_db, dict.fromkeys(ids, "cancelled"))
    assert await sdk_db.fetchval("SELECT count(*) FROM rmsg_delivery") == 0
    assert await sdk_db.fetchval("SELECT count(*) FROM sdk_effects") == 0
