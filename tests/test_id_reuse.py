"""An id is never reused: after the retention purge deletes a finished message, its id
stays refused (409 ``id_reused``), for its producer and for any other, so that a
consumer's inbox (keyed by the id) can never swallow a new message as a repeat. Over a
real HTTP server, PostgreSQL and RabbitMQ, with the SDKs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import asyncpg
import httpx
import pytest

from reliable_msg.errors import ConfigError, Conflict
from reliable_msg.sdk.client import RetryPolicy
from reliable_msg.sdk.consumer import Consumer
from reliable_msg.sdk.producer import Producer
from reliable_msg.service.api import create_app
from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from tests.conftest import AMQP_URL, GROUP_TOKENS, OTHER_PRODUCER, PRODUCER, auth
from tests.helpers import rabbit
from tests.helpers.consumers import inventory_consumer, running_effects
from tests.helpers.waiting import wait_until

FAST = RetryPolicy(attempts=3, initial=0.05, max_wait=0.2, deadline=2.0)


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(scanner={"retention": 0.5})


@pytest.fixture
async def http(service_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=service_url) as c:
        yield c


def message(id: str, n: int) -> dict[str, object]:
    return {"id": id, "topic": "order.paid", "payload": {"n": n}}


async def purged(runtime: Runtime, db: asyncpg.Connection, id: str) -> None:
    async def gone() -> bool:
        await runtime.purger.run_once()
        return not await db.fetchval("SELECT count(*) FROM rmsg_message WHERE id = $1", id)

    await wait_until(gone, within=10, every=0.2)


async def test_a_purged_id_is_refused_for_every_producer_single_and_batch(
    runtime: Runtime, http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    r = await http.post("/v1/messages", json=message("r-1", 1), headers=auth(PRODUCER))
    assert r.status_code == 201, r.text
    r = await http.post("/v1/messages/r-1/cancel", headers=auth(PRODUCER))
    assert r.status_code == 200, r.text
    await purged(runtime, db, "r-1")

    for token in (PRODUCER, OTHER_PRODUCER):
        for body in (message("r-1", 1), message("r-1", 2)):
            r = await http.post("/v1/messages", json=body, headers=auth(token))
            assert r.status_code == 409, r.text
            assert r.json()["error"]["code"] == "id_reused"
        batch = {"messages": [message("r-2", 2), message("r-1", 1)]}
        r = await http.post("/v1/batch/prepare", json=batch, headers=auth(token))
        assert r.status_code == 200, r.text
        [fresh, reused] = r.json()["results"]
        assert fresh["ok"] or fresh["error"]["code"] == "id_conflict"
        assert (reused["ok"], reused["error"]["code"]) == (False, "id_reused")
    assert await db.fetchval("SELECT count(*) FROM rmsg_message WHERE id = 'r-1'") == 0


async def test_a_reused_id_after_the_purge_is_refused_to_the_producer_not_swallowed(
    runtime: Runtime,
    service_url: str,
    settings: Settings,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
) -> None:
    """Before: the second message with the id was taken, delivered, and the consumer's
    inbox acked it as a repeat without running the handler: lost."""
    async with Producer(service_url, PRODUCER, retry=FAST) as producer:
        async with pool.acquire() as conn:
            async with producer.transaction(conn, "order.paid", {"n": 1}, id="r-3") as sent:
                pass
        assert sent.confirmed
        await ack_by_hand(service_url, "r-3", "credit", "wms")  # groups with no consumer here
        consumer = inventory_consumer(service_url, settings, pool, FAST, Consumer)
        async with running_effects(consumer):

            async def finished() -> bool:
                status = await sdk_db.fetchval("SELECT status FROM rmsg_message WHERE id = 'r-3'")
                return bool(status == "done")

            await wait_until(finished, within=15)
            await purged(runtime, sdk_db, "r-3")
            await sdk_db.execute("DELETE FROM rmsg_producer_marker")  # as a marker purge would

            ran = False
            with pytest.raises(Conflict) as refused:
                async with pool.acquire() as conn:
                    async with producer.transaction(conn, "order.paid", {"n": 2}, id="r-3"):
                        ran = True
            assert refused.value.code == "id_reused"
            assert not ran
    assert await sdk_db.fetchval("SELECT count(*) FROM rmsg_message WHERE id = 'r-3'") == 0
    assert await sdk_db.fetchval("SELECT count(*) FROM sdk_effects") == 1


async def ack_by_hand(service_url: str, id: str, *groups: str) -> None:
    async with httpx.AsyncClient(base_url=service_url) as c:
        for group in groups:
            r = await c.post(f"/v1/messages/{id}/ack", headers=auth(GROUP_TOKENS[group]))
            assert r.status_code == 200, r.text


async def test_a_prepare_racing_the_purge_never_takes_the_id(
    http: httpx.AsyncClient, db: asyncpg.Connection, database_url: str
) -> None:
    """The purge's delete of a finished message is open (uncommitted) while the same id
    is prepared again: the prepare must not wait for it and then take the id."""
    r = await http.post("/v1/messages", json=message("r-4", 1), headers=auth(PRODUCER))
    assert r.status_code == 201, r.text
    r = await http.post("/v1/messages/r-4/cancel", headers=auth(PRODUCER))
    assert r.status_code == 200, r.text

    purge = await asyncpg.connect(database_url)
    try:
        tx = purge.transaction()
        await tx.start()
        await purge.execute("DELETE FROM rmsg_message WHERE id = 'r-4'")  # as the purge does
        racing = asyncio.create_task(
            http.post("/v1/messages", json=message("r-4", 2), headers=auth(OTHER_PRODUCER))
        )
        await asyncio.sleep(0.5)
        await tx.commit()
        r = await asyncio.wait_for(racing, 10)
    finally:
        await purge.close()
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] in ("id_conflict", "id_reused")
    assert await db.fetchval("SELECT count(*) FROM rmsg_message WHERE id = 'r-4'") == 0
    r = await http.post("/v1/messages", json=message("r-4", 2), headers=auth(OTHER_PRODUCER))
    assert (r.status_code, r.json()["error"]["code"]) == (409, "id_reused")


async def test_ids_are_forgotten_after_id_retention_when_it_is_set(
    make_settings: Callable[..., Settings], db: asyncpg.Connection
) -> None:
    """``scanner.id_retention`` bounds ``rmsg_used_id``: an id whose message was purged is
    freed once it is that old, never while its message is still stored."""
    settings = make_settings(scanner={"retention": 0.5, "id_retention": 1.0})
    rt = await Runtime.create(settings, scanners=False)
    await rt.start()
    try:
        transport = httpx.ASGITransport(app=create_app(rt))
        async with httpx.AsyncClient(transport=transport, base_url="http://rmsg") as http:
            for id in ("f-1", "f-2"):
                r = await http.post("/v1/messages", json=message(id, 1), headers=auth(PRODUCER))
                assert r.status_code == 201, r.text
            r = await http.post("/v1/messages/f-1/cancel", headers=auth(PRODUCER))
            assert r.status_code == 200, r.text
            await db.execute("UPDATE rmsg_used_id SET used_at = now() - interval '1 hour'")
            await purged(rt, db, "f-1")

            used = await db.fetch("SELECT id FROM rmsg_used_id ORDER BY id")
            assert [r["id"] for r in used] == ["f-2"]  # f-2 still pending: its id stays
            r = await http.post("/v1/messages", json=message("f-1", 2), headers=auth(PRODUCER))
            assert r.status_code == 201, r.text
    finally:
        await rt.stop()
        await rabbit.delete_topology(AMQP_URL, settings)


def test_id_retention_shorter_than_the_message_retention_is_refused(
    make_settings: Callable[..., Settings],
) -> None:
    with pytest.raises(ConfigError, match="id_retention"):
        make_settings(scanner={"retention": 3600.0, "id_retention": 60.0})
