"""Check-back over real HTTP follows no redirect and reads at most 4 KiB of answer: a
producer endpoint that redirects to an endpoint answering "committed", and one whose
answer is a "committed" padded far past 4 KiB, never get a message confirmed."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest
from aiohttp import web

from reliable_msg.service.checkback_client import MAX_ANSWER_BYTES
from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from tests.conftest import PRODUCER, auth
from tests.helpers import rabbit
from tests.helpers.checkback import checked_at
from tests.helpers.waiting import wait_until

CHECK_MAX = 2
#: Far past what check-back reads; valid JSON only when read to its end.
HUGE_PADDING = 4 * 1024 * 1024


class Producer:
    """``/check`` redirects (302 or 307) or answers a huge body, by message id;
    ``/committed`` says "committed" to whoever comes."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    async def check(self, request: web.Request) -> web.StreamResponse:
        id = (await request.json())["id"]
        self.calls[f"check {id}"] += 1
        if id.startswith("redirect-"):
            status = int(id.removeprefix("redirect-"))
            target = f"http://{request.host}/committed"
            return web.Response(status=status, headers={"Location": target})
        body = b'{"status": "committed"' + b" " * HUGE_PADDING + b"}"
        return web.Response(body=body, content_type="application/json")

    async def committed(self, request: web.Request) -> web.Response:
        self.calls["committed"] += 1
        return web.json_response({"status": "committed"})


@pytest.fixture
async def producer() -> AsyncIterator[tuple[Producer, int]]:
    found = Producer()
    app = web.Application()
    app.router.add_post("/check", found.check)
    app.router.add_route("*", "/committed", found.committed)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield found, runner.addresses[0][1]
    finally:
        await runner.cleanup()


@pytest.fixture
def settings(make_settings: Callable[..., Settings], producer: tuple[Producer, int]) -> Settings:
    _, port = producer
    return make_settings(
        producers=checked_at(port, PRODUCER),
        checkback={"max_tries": CHECK_MAX, "timeout": 2.0},
    )


async def _settle(runtime: Runtime, db: asyncpg.Connection) -> dict[str, Any]:
    async def settled() -> bool:
        await runtime.checkback.run_once()
        count = await db.fetchval("SELECT count(*) FROM rmsg_message WHERE status = 'pending'")
        return bool(count == 0)

    await wait_until(settled, within=20, every=0.05)
    rows = await db.fetch("SELECT id, status, check_attempts, last_error FROM rmsg_message")
    return {r["id"]: (r["status"], r["check_attempts"], r["last_error"]) for r in rows}


async def test_check_back_follows_no_redirect_and_reads_at_most_4_kib(
    client: httpx.AsyncClient,
    runtime: Runtime,
    settings: Settings,
    producer: tuple[Producer, int],
    amqp: aio_pika.abc.AbstractConnection,
    db: asyncpg.Connection,
) -> None:
    endpoint, _ = producer
    ids = ["redirect-302", "redirect-307", "huge"]
    for id in ids:
        body = {"id": id, "topic": "order.paid", "payload": {"id": id}}
        r = await client.post("/v1/messages", json=body, headers=auth(PRODUCER))
        assert r.status_code == 201, r.text

    found = await _settle(runtime, db)

    assert endpoint.calls["committed"] == 0, "a redirect was followed"
    assert {id: endpoint.calls[f"check {id}"] for id in ids} == dict.fromkeys(ids, CHECK_MAX)
    assert {id: found[id][:2] for id in ids} == dict.fromkeys(ids, ("dead", CHECK_MAX))
    assert "HTTP 302" in found["redirect-302"][2]
    assert "HTTP 307" in found["redirect-307"][2]
    # Only the first 4 KiB were read: the JSON never closes, so it is not understood.
    reason = found["huge"][2]
    assert "not understood" in reason, reason
    assert len(reason) < MAX_ANSWER_BYTES
    for group in settings.groups:
        assert await rabbit.drain(amqp, settings.queue_name(group), wait=0.2) == []
