"""Three ``serve`` processes over one database, no balancer: a producer round-robins
prepare and confirm over them, the consumer its acks, one instance both used is killed
with SIGKILL mid-run, and every message is still done, with exactly one effect in the
consumer's database."""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import httpx
import pytest

from reliable_msg.sdk.consumer import Consumer, Received, install
from reliable_msg.service.settings import Settings
from tests.conftest import AMQP_URL, GROUP_TOKENS, PRODUCER, auth
from tests.helpers.service import Instance, remove_traces, running, write_config
from tests.helpers.waiting import wait_until

MESSAGES = 300
#: Instance 2 is killed once this many messages are confirmed.
KILL_AFTER = MESSAGES // 3
PRODUCERS = 8
#: Only group credit subscribes to it (``order.*``): one consumer makes a message done.
TOPIC = "order.refunded"
GROUP = "credit"


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(
        checkback={"after": 3600.0},  # the producer here always confirms, retrying
        redelivery={"ack_timeout": 1.0, "backoff_cap": 1.0, "max_attempts": 50},
        scanner={"interval": 0.2},
    )


@pytest.fixture
async def pool(database_url: str, db: asyncpg.Connection) -> AsyncIterator[asyncpg.Pool]:
    """The consumer's own database: its inbox and an effects table with no unique key,
    so a second effect of one message would show."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=8)
    async with pool.acquire() as conn:
        await install(conn)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS tri_effects (message_id text NOT NULL,"
            " at timestamptz NOT NULL DEFAULT now())"
        )
        await conn.execute("TRUNCATE tri_effects")
        await conn.execute("DELETE FROM rmsg_inbox WHERE message_id LIKE 'tri-%'")
    yield pool
    async with pool.acquire() as conn:
        await conn.execute("DROP TABLE tri_effects")
        await conn.execute("DELETE FROM rmsg_inbox WHERE message_id LIKE 'tri-%'")
    await pool.close()


class RoundRobin:
    """A producer that sends each call to the next instance, and on a connection error,
    a timeout or a 5xx retries it on the next one; it does not know which one died."""

    def __init__(self, instances: list[Instance]) -> None:
        self._clients = [
            httpx.AsyncClient(base_url=i.url, timeout=5, headers=auth(PRODUCER)) for i in instances
        ]
        self._next = itertools.cycle(range(len(instances)))
        self.failures = 0

    async def close(self) -> None:
        for client in self._clients:
            await client.aclose()

    async def post(self, path: str, body: object = None) -> httpx.Response:
        for _ in range(60):
            client = self._clients[next(self._next)]
            try:
                response = await client.post(path, json=body)
            except httpx.TransportError:
                response = None
            if response is not None and response.status_code < 500:
                return response
            self.failures += 1
            await asyncio.sleep(0.05)
        raise AssertionError(f"{path}: no instance answered")

    async def send(self, id: str) -> None:
        body = {"id": id, "topic": TOPIC, "payload": {"refund": id}}
        prepared = await self.post("/v1/messages", body)
        assert prepared.status_code in (200, 201), prepared.text
        confirmed = await self.post(f"/v1/messages/{id}/confirm")
        assert confirmed.status_code == 200 and confirmed.json()["status"] in ("sent", "done")


async def test_three_instances_one_killed_every_message_done_once(
    settings: Settings,
    db: asyncpg.Connection,
    pool: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    config = write_config(settings, tmp_path / "config.toml")
    ids = [f"tri-{i:04d}" for i in range(MESSAGES)]
    try:
        with running(config, tmp_path, count=3) as instances:
            consumer = Consumer(
                GROUP,
                service_url=[i.url for i in instances],  # acks in turn over the three
                token=GROUP_TOKENS[GROUP],
                amqp_url=AMQP_URL,
                pool=pool,
                queue=settings.queue_name(GROUP),
                redis_url=settings.redis_url,
                namespace=settings.fallback.namespace,
                shards=settings.fallback.shards,
                poll_interval=0.2,
            )

            @consumer.handler(TOPIC)
            async def effect(conn: asyncpg.Connection, message: Received) -> None:
                await conn.execute("INSERT INTO tri_effects (message_id) VALUES ($1)", message.id)

            consuming = asyncio.create_task(consumer.run(handle_signals=False))
            producer = RoundRobin(instances)
            try:
                await produce(producer, ids, instances[2])

                async def all_done() -> bool:
                    n = await db.fetchval("SELECT count(*) FROM rmsg_message WHERE status = 'done'")
                    return bool(n == MESSAGES)

                await wait_until(all_done, within=90, every=0.2)
            finally:
                await producer.close()
                consumer.request_stop()
                await asyncio.wait_for(consuming, 30)
            assert instances[2].exit_code() is not None
            assert producer.failures > 0, "the kill went unnoticed by the producer"
            for survivor in instances[:2]:
                assert await acks_taken(survivor) > 0, survivor.url
    finally:
        await remove_traces(settings)

    effects = await db.fetch(
        "SELECT message_id, count(*) AS n FROM tri_effects GROUP BY message_id"
    )
    assert {r["message_id"] for r in effects} == set(ids)
    assert {r["n"] for r in effects} == {1}, [r for r in effects if r["n"] != 1]
    stuck = await db.fetchval("SELECT count(*) FROM rmsg_message WHERE status <> 'done'")
    open_deliveries = await db.fetchval("SELECT count(*) FROM rmsg_delivery WHERE status <> 'done'")
    assert (stuck, open_deliveries) == (0, 0)


async def acks_taken(instance: Instance) -> float:
    """The acks of group credit ``instance`` took, from its ``/metrics``."""
    async with httpx.AsyncClient(base_url=instance.url, timeout=5) as client:
        text = (await client.get("/metrics")).text
    found = re.search(rf'^rmsg_acks_total{{group="{GROUP}"}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def produce(producer: RoundRobin, ids: list[str], victim: Instance) -> None:
    """Send every id from concurrent workers; kill ``victim`` once a third are confirmed
    and the consumer acked some through it."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for id in ids:
        queue.put_nowait(id)
    confirmed = 0
    killed = asyncio.Event()

    async def worker() -> None:
        nonlocal confirmed
        while not queue.empty():
            await producer.send(queue.get_nowait())
            confirmed += 1
            if confirmed >= KILL_AFTER and not killed.is_set():
                killed.set()

                async def acked_through_victim() -> bool:
                    return await acks_taken(victim) > 0

                await wait_until(acked_through_victim, within=30, every=0.05)
                victim.kill()

    await asyncio.gather(*(worker() for _ in range(PRODUCERS)))
    assert killed.is_set()
