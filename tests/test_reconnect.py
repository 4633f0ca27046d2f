"""A dependency that goes away for :data:`OUTAGE` seconds and comes back is reconnected to
by the same service process, never restarted, and by a running consumer.

Each test points one of ``database_url``, ``amqp_url`` or ``redis_url`` of a real
``reliable-msg serve`` process (and of an in-process consumer) at a fault proxy in the
test's event loop, takes the proxy down (every connection cut, new ones refused), checks
what the service answers meanwhile, and brings the proxy up again on the same port. The
test's own connections go to the real servers directly.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest
from aiohttp import web

from reliable_msg.harness.proxy import FaultProxy
from reliable_msg.sdk import consumer as consumer_sdk
from reliable_msg.sdk.client import RetryPolicy
from reliable_msg.sdk.consumer import Consumer, Poison, Received, Source
from reliable_msg.sdk.consumer.amqp import AmqpSource
from reliable_msg.service.settings import Settings
from reliable_msg.transports.redis import shard_keys
from reliable_msg.transports.redis_client import redis_client
from reliable_msg.transports.switch import Mode, Switch
from tests.conftest import ADMIN, AMQP_URL, GROUP_TOKENS, PRODUCER, auth
from tests.helpers import rabbit, tables
from tests.helpers.consumers import inventory_consumer, running_effects
from tests.helpers.service import Instance, remove_traces, running_async, write_config
from tests.helpers.waiting import wait_until

#: Seconds a dependency stays away: the figure the requirement states.
OUTAGE = 30.0
#: Longest one API call may take before the test calls it a hang. The service answers
#: within its own timeouts (publish 2 s, readiness probes 2 s); this is well above them.
CALL_TIMEOUT = 15.0
SHARDS = 8
RETRY = RetryPolicy(attempts=8, initial=0.05, max_wait=0.5, deadline=20.0)


@pytest.fixture
async def sdk_db(db: asyncpg.Connection) -> asyncpg.Connection:
    await consumer_sdk.install(db)
    await db.execute("CREATE TABLE IF NOT EXISTS sdk_effects (group_name text, message_id text)")
    await tables.empty(db, "sdk_effects", "rmsg_inbox")
    return db


@pytest.fixture
async def check_url() -> AsyncIterator[tuple[str, dict[str, int]]]:
    """A producer's check-back endpoint that answers ``committed``; and its calls per id."""
    calls: dict[str, int] = {}

    async def check(request: web.Request) -> web.Response:
        id = (await request.json())["id"]
        calls[id] = calls.get(id, 0) + 1
        return web.json_response({"status": "committed"})

    app = web.Application()
    app.router.add_post("/check", check)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/check", calls
    await runner.cleanup()


@asynccontextmanager
async def serving(
    settings: Settings, tmp_path: Path, **overrides: Any
) -> AsyncIterator[tuple[Instance, httpx.AsyncClient]]:
    """A ``serve`` process with ``settings`` and ``overrides`` (the proxied URL), and an
    HTTP client on it; what it declared is removed afterwards."""
    config = write_config(settings, tmp_path / "config.toml", **overrides)
    try:
        async with (
            running_async(config, tmp_path) as instance,
            httpx.AsyncClient(base_url=instance.url, timeout=CALL_TIMEOUT) as api,
        ):
            yield instance, api
    finally:
        await remove_traces(settings)


@asynccontextmanager
async def gone(proxy: FaultProxy) -> AsyncIterator[None]:
    """The server behind ``proxy`` gone for :data:`OUTAGE` seconds. The block runs at the
    start of the outage; the rest of it passes before the server is back."""
    loop = asyncio.get_running_loop()
    await proxy.down()
    back_at = loop.time() + OUTAGE
    try:
        yield
        await asyncio.sleep(max(0.0, back_at - loop.time()))
    finally:
        await proxy.up()


class ObservedConsumer(Consumer):
    """Records the ids that came through RabbitMQ and each mode change."""

    via_amqp: list[str]
    modes: list[Mode]

    async def consume(self, message: Received | Poison, source: Source) -> None:
        if isinstance(source, AmqpSource):
            self.via_amqp.append(message.id)
        await super().consume(message, source)

    def set_mode(self, mode: Mode) -> None:
        if mode is not self.mode:
            self.modes.append(mode)
        super().set_mode(mode)


@asynccontextmanager
async def consuming(
    service_url: str,
    settings: Settings,
    pool: asyncpg.Pool,
    *,
    amqp_url: str = AMQP_URL,
    redis_url: str | None = None,
) -> AsyncIterator[ObservedConsumer]:
    """An ``inventory`` consumer running in the test's event loop until the block ends."""
    consumer = inventory_consumer(
        service_url,
        settings,
        pool,
        RETRY,
        ObservedConsumer,
        amqp_url=amqp_url,
        redis_url=redis_url or settings.redis_url,
        namespace=settings.fallback.namespace,
        shards=SHARDS,
        poll_interval=0.2,
        claim_idle=1.0,
    )
    consumer.via_amqp, consumer.modes = [], []
    async with running_effects(consumer, stop_within=30):
        yield consumer


# -- observations ------------------------------------------------------------------------


async def prepare(api: httpx.AsyncClient, id: str) -> httpx.Response:
    body = {"id": id, "topic": "order.paid", "payload": {"id": id}}
    return await api.post("/v1/messages", json=body, headers=auth(PRODUCER))


async def confirm(api: httpx.AsyncClient, id: str) -> httpx.Response:
    return await api.post(f"/v1/messages/{id}/confirm", headers=auth(PRODUCER))


async def send(api: httpx.AsyncClient, id: str) -> None:
    """Prepare and confirm ``id``; both must succeed at the first try."""
    r = await prepare(api, id)
    assert r.status_code == 201, r.text
    r = await confirm(api, id)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "sent"


async def readiness(api: httpx.AsyncClient) -> tuple[int, dict[str, str]]:
    """``/readyz``: its status code, and its body (status, mode and one entry per
    dependency: ``ok`` or why not)."""
    r = await api.get("/readyz")
    body: dict[str, str] = r.json()
    return r.status_code, body


async def start_time(api: httpx.AsyncClient) -> float:
    """The answering process's start time, from its own metrics."""
    text = (await api.get("/metrics")).text
    [line] = [x for x in text.splitlines() if x.startswith("process_start_time_seconds ")]
    return float(line.split()[1])


async def delivered(pool: asyncpg.Pool, ids: list[str]) -> bool:
    """Every one of ``ids`` handled by the ``inventory`` consumer and acked to the service."""
    done = await pool.fetchval(
        "SELECT count(*) FROM rmsg_delivery WHERE group_name = 'inventory' AND status = 'done'"
        " AND message_id = ANY($1::text[])",
        ids,
    )
    effects = await pool.fetchval(
        "SELECT count(DISTINCT message_id) FROM sdk_effects WHERE message_id = ANY($1::text[])",
        ids,
    )
    return bool(done == len(ids) and effects == len(ids))


async def assert_no_double_effect(pool: asyncpg.Pool) -> None:
    twice = await pool.fetchval(
        "SELECT count(*) FROM (SELECT message_id FROM sdk_effects GROUP BY message_id"
        " HAVING count(*) > 1) AS d"
    )
    assert twice == 0, "a message was applied twice"


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code, r.text


async def assert_same_process(instance: Instance, api: httpx.AsyncClient, started: float) -> None:
    assert instance.exit_code() is None, f"the service exited; log:\n{instance.log_tail()}"
    assert await start_time(api) == started, "another process answers"


# -- PostgreSQL --------------------------------------------------------------------------


@pytest.mark.usefixtures("sdk_db")
async def test_postgresql_gone_and_back(
    make_settings: Callable[..., Settings],
    pool: asyncpg.Pool,
    database_url: str,
    check_url: tuple[str, dict[str, int]],
    tmp_path: Path,
) -> None:
    url, checks = check_url
    settings = make_settings(
        producers={"order": {"check_url": url, "token": PRODUCER}},
        redelivery={"ack_timeout": 1.0},
    )
    server, dbname = database_url.rsplit("/", 1)
    port = int(server.rsplit(":", 1)[1])
    async with FaultProxy("127.0.0.1", port) as proxy:
        proxied = proxy.url("postgresql", "postgres", f"/{dbname}")
        # The consumer's own database goes through the proxy too: its pool must recover.
        consumer_pool = await asyncpg.create_pool(proxied, min_size=1, max_size=4)
        try:
            async with (
                serving(settings, tmp_path, database_url=proxied) as (instance, api),
                consuming(instance.url, settings, consumer_pool) as consumer,
            ):
                started = await start_time(api)
                await send(api, "pg-before")
                await wait_until(lambda: delivered(pool, ["pg-before"]), within=30)

                async with gone(proxy):

                    async def not_ready() -> bool:
                        status, body = await readiness(api)
                        return status == 503 and body["postgres"] != "ok"

                    await wait_until(not_ready, within=30, every=0.5)
                    _, body = await readiness(api)
                    assert body["status"] == "not_ready"
                    assert (await api.get("/healthz")).status_code == 200
                    # Each call answers in time with a 503 the SDKs retry, never a 500.
                    r = await prepare(api, "pg-during")
                    assert_error(r, 503, "store_unavailable")
                    assert r.headers["Retry-After"] == "1"
                    assert_error(await confirm(api, "pg-before"), 503, "store_unavailable")
                    r = await api.post(
                        "/v1/messages/pg-before/ack", headers=auth(GROUP_TOKENS["wms"])
                    )
                    assert_error(r, 503, "store_unavailable")
                    r = await api.get("/v1/messages/pg-before", headers=auth(PRODUCER))
                    assert_error(r, 503, "store_unavailable")

                async def ready() -> bool:
                    return (await readiness(api))[0] == 200

                await wait_until(ready, within=60, every=0.5)
                # The API works again: prepare, confirm, and the consumer's handler (on
                # its reconnected pool) and ack.
                await send(api, "pg-after")
                await wait_until(lambda: delivered(pool, ["pg-after"]), within=30)
                r = await api.post("/v1/messages/pg-after/ack", headers=auth(GROUP_TOKENS["wms"]))
                assert r.status_code == 200, r.text

                # Redelivery runs again: credit has no consumer, so its delivery of a
                # message confirmed after the outage is republished.
                async def redelivered() -> bool:
                    attempts = await pool.fetchval(
                        "SELECT attempts FROM rmsg_delivery"
                        " WHERE message_id = 'pg-after' AND group_name = 'credit'"
                    )
                    return bool(attempts >= 2)

                await wait_until(redelivered, within=30)

                # Check-back runs again: a message prepared after the outage and never
                # confirmed is asked about, and published on the producer's answer.
                r = await prepare(api, "pg-after-unconfirmed")
                assert r.status_code == 201, r.text

                async def checked_back() -> bool:
                    status = await pool.fetchval(
                        "SELECT status FROM rmsg_message WHERE id = 'pg-after-unconfirmed'"
                    )
                    return bool(status == "sent")

                await wait_until(checked_back, within=30)
                assert checks["pg-after-unconfirmed"] >= 1
                await assert_same_process(instance, api, started)
                assert consumer.modes == []
                await assert_no_double_effect(pool)
        finally:
            await consumer_pool.close()
    assert await pool.fetchval("SELECT count(*) FROM rmsg_message WHERE id = 'pg-during'") == 0


# -- RabbitMQ ----------------------------------------------------------------------------


@pytest.mark.usefixtures("sdk_db")
async def test_rabbitmq_gone_and_back(
    make_settings: Callable[..., Settings],
    pool: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    threshold = 3
    settings = make_settings(
        fallback={"failure_threshold": threshold, "shards": SHARDS, "poll_interval": 0.2},
        # No redelivery: every publish the test sees is a first one.
        redelivery={"ack_timeout": 3600.0},
    )
    async with FaultProxy("127.0.0.1", 5672) as proxy:
        proxied = proxy.url("amqp", "guest:guest", "/")
        async with (
            serving(settings, tmp_path, amqp_url=proxied) as (instance, api),
            consuming(instance.url, settings, pool, amqp_url=proxied) as consumer,
        ):
            started = await start_time(api)
            await send(api, "mq-before")
            await wait_until(lambda: delivered(pool, ["mq-before"]), within=30)
            during = [f"mq-during-{i}" for i in range(5)]

            async with gone(proxy):

                async def disconnected() -> bool:
                    return (await readiness(api))[1]["rabbitmq"] != "ok"

                await wait_until(disconnected, within=30, every=0.5)
                # Confirms fail with 503 until the failures trip the switch; from then
                # on they go to the Redis fallback (README: When RabbitMQ is down).
                refused: list[httpx.Response] = []
                for id in during:
                    assert (await prepare(api, id)).status_code == 201
                    while (r := await confirm(api, id)).status_code != 200:
                        assert_error(r, 503, "broker_unavailable")
                        refused.append(r)
                        assert len(refused) < threshold, "the switch did not trip"
                status, body = await readiness(api)
                assert (status, body["mode"], body["redis"]) == (200, "degraded", "ok")
                # The consumer lost RabbitMQ too and takes them from Redis.
                await wait_until(lambda: delivered(pool, during), within=30)
                assert consumer.mode is Mode.DEGRADED

            async def normal() -> bool:
                _, body = await readiness(api)
                return body["mode"] == "normal" and body["rabbitmq"] == "ok"

            await wait_until(normal, within=60, every=0.5)
            await wait_until(lambda: consumer.mode is Mode.NORMAL, within=30)
            await send(api, "mq-after")
            # Published to RabbitMQ again: it is in wms's queue (nobody consumes there) ...
            async with await aio_pika.connect(AMQP_URL) as amqp:
                queued = await rabbit.drain(amqp, settings.queue_name("wms"), wait=1.0)
            after = [m for m in queued if m.message_id == "mq-after"]
            assert [m.headers["x-rmsg-attempt"] for m in after] == [1]
            # ... and the consumer, attached to its queue again, took it from there.
            await wait_until(lambda: delivered(pool, ["mq-after"]), within=30)
            assert "mq-after" in consumer.via_amqp
            assert not set(during) & set(consumer.via_amqp), "sent through RabbitMQ while down"
            assert consumer.modes == [Mode.DEGRADED, Mode.NORMAL]
            await assert_same_process(instance, api, started)
            await assert_no_double_effect(pool)


# -- Redis -------------------------------------------------------------------------------


@pytest.mark.usefixtures("sdk_db")
async def test_redis_gone_and_back(
    make_settings: Callable[..., Settings],
    pool: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    settings = make_settings(
        # The switch stays as the test sets it: no probe clears it while the test looks.
        fallback={"shards": SHARDS, "poll_interval": 0.2, "probe_interval": 3600.0},
        redelivery={"ack_timeout": 3600.0},
    )
    namespace = settings.fallback.namespace
    async with FaultProxy("127.0.0.1", 6379) as proxy:
        proxied = proxy.url("redis", path="/0")
        async with (
            serving(settings, tmp_path, redis_url=proxied) as (instance, api),
            consuming(instance.url, settings, pool, redis_url=proxied) as consumer,
            redis_client(settings.redis_url) as redis,
        ):
            started = await start_time(api)
            await send(api, "rd-before")
            await wait_until(lambda: delivered(pool, ["rd-before"]), within=30)
            during = [f"rd-during-{i}" for i in range(5)]

            async with gone(proxy):

                async def redis_unavailable() -> bool:
                    return (await readiness(api))[1]["redis"] != "ok"

                await wait_until(redis_unavailable, within=30, every=0.5)
                # Normal mode needs no Redis: ready, and every call succeeds at once.
                status, body = await readiness(api)
                assert (status, body["mode"], body["rabbitmq"]) == (200, "normal", "ok")
                for id in during:
                    await send(api, id)
                await wait_until(lambda: delivered(pool, during), within=30)
                r = await api.get("/v1/stats", headers=auth(ADMIN))
                assert r.status_code == 200, r.text
                assert "fallback_error" in r.json()["broker"]

            async def redis_ok() -> bool:
                return (await readiness(api))[1]["redis"] == "ok"

            await wait_until(redis_ok, within=60, every=0.5)
            # The switch is followed again: the service and the consumer see a flip made
            # elsewhere, confirms write to the fallback shards and the consumer drains them.
            switch = Switch(redis, who="test", namespace=namespace)
            assert await switch.trip("test: degraded on purpose")

            async def degraded() -> bool:
                return (await readiness(api))[1]["mode"] == "degraded"

            await wait_until(degraded, within=30, every=0.2)
            await send(api, "rd-after")
            wms = sum([await redis.xlen(k) for k in shard_keys(namespace, "wms", SHARDS)])
            assert wms == 1, "the confirm did not write to the fallback shards"
            await wait_until(lambda: delivered(pool, ["rd-after"]), within=30)
            assert "rd-after" not in consumer.via_amqp
            assert await switch.clear("test: over")

            async def normal() -> bool:
                return (await readiness(api))[1]["mode"] == "normal"

            await wait_until(normal, within=30, every=0.2)
            await wait_until(lambda: consumer.mode is Mode.NORMAL, within=30)
            assert consumer.modes == [Mode.DEGRADED, Mode.NORMAL]
            # The report reads Redis again: the flips and the depths, no error.
            broker = (await api.get("/v1/stats", headers=auth(ADMIN))).json()["broker"]
            assert "fallback_error" not in broker
            assert [h["by"] for h in broker["history"][:2]] == ["test", "test"]
            assert broker["fallback_depth"]["wms"] == 1
            await assert_same_process(instance, api, started)
            await assert_no_double_effect(pool)
