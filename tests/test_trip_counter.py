"""Every instance's count of failed publishes starts again when the switch changes
(issue 11, item 8): two instances count failures during an outage, one trips the switch,
the other's probe clears it; after that, one failure on either does not trip it again.
RabbitMQ is taken away by a proxy in front of it that both instances use."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import asyncpg
import httpx

from reliable_msg.harness.proxy import FaultProxy
from reliable_msg.service.api import create_app
from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from reliable_msg.transports.redis import delete_namespace
from tests.conftest import AMQP_URL, PRODUCER, auth
from tests.helpers import rabbit
from tests.helpers.waiting import wait_until

THRESHOLD = 3


@asynccontextmanager
async def instance(settings: Settings) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient]]:
    """A started runtime without scanners (no probe runs unless the test calls it), and
    a client of its API."""
    rt = await Runtime.create(settings, scanners=False)
    await rt.start()
    try:
        transport = httpx.ASGITransport(app=create_app(rt))
        async with httpx.AsyncClient(transport=transport, base_url="http://rmsg") as client:
            yield rt, client
    finally:
        await rt.stop()


async def confirm(client: httpx.AsyncClient, id: str) -> int:
    body = {"id": id, "topic": "order.paid", "payload": {}}
    r = await client.post("/v1/messages", json=body, headers=auth(PRODUCER))
    assert r.status_code == 201, r.text
    r = await client.post(f"/v1/messages/{id}/confirm", headers=auth(PRODUCER))
    return r.status_code


async def test_one_failure_after_recovery_trips_no_instance_again(
    make_settings: Callable[..., Settings], db: asyncpg.Connection
) -> None:
    async with FaultProxy("127.0.0.1", 5672) as proxy, AsyncExitStack() as stack:
        settings = make_settings(
            amqp_url=proxy.url("amqp", "guest:guest", "/"),
            fallback={"failure_threshold": THRESHOLD, "poll_interval": 0.2},
        )
        stack.push_async_callback(rabbit.delete_topology, AMQP_URL, settings)
        stack.push_async_callback(delete_namespace, settings.redis_url, settings.fallback.namespace)
        a, api_a = await stack.enter_async_context(instance(settings))
        b, api_b = await stack.enter_async_context(instance(settings))
        assert a.switch is not None and b.switch is not None

        await proxy.down()
        await wait_until(lambda: not a.publisher.connected and not b.publisher.connected, within=15)
        # A counts failures below the threshold; B reaches it and trips the switch.
        assert [await confirm(api_a, f"a-{i}") for i in range(THRESHOLD - 1)] == [503, 503]
        assert a.publisher.failures == THRESHOLD - 1
        statuses = [await confirm(api_b, f"b-{i}") for i in range(THRESHOLD)]
        assert statuses == [503, 503, 200], "B's third failure trips and writes to Redis"
        await wait_until(lambda: a.switch is not None and a.switch.degraded, within=5)

        await proxy.up()
        await wait_until(lambda: a.publisher.connected and b.publisher.connected, within=30)
        assert await b.degradation.probe()
        await wait_until(lambda: a.switch is not None and not a.switch.degraded, within=5)

        # One failure on each after recovery: counted from zero, no trip.
        await proxy.down()
        await wait_until(lambda: not a.publisher.connected and not b.publisher.connected, within=15)
        assert await confirm(api_a, "a-after") == 503
        assert await confirm(api_b, "b-after") == 503
        assert (a.publisher.failures, b.publisher.failures) == (1, 1)
        assert not a.switch.degraded and not b.switch.degraded
        assert [h["mode"] for h in await a.switch.history()] == ["normal", "degraded"]
