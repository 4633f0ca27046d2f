"""A producer's check-back endpoint served over real HTTP, for the check-back tests."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web


class ProducerEndpoint:
    """A producer's check-back endpoint whose answer per message id the test sets."""

    def __init__(self) -> None:
        self.answers: dict[str, str] = {}
        self.calls: Counter[str] = Counter()
        self.seen: list[tuple[str | None, dict[str, Any]]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls[body["id"]] += 1
        self.seen.append((request.headers.get("Authorization"), body))
        answer = self.answers.get(body["id"], "unknown")
        if answer == "hang":
            await asyncio.sleep(30)
        if answer == "error":
            return web.Response(status=500, text="boom")
        return web.json_response({"status": answer})


@asynccontextmanager
async def serving_endpoint(
    handle: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[int]:
    """``handle`` served at ``/check`` on a free localhost port; yields the port. A
    handler is cancelled when its caller hangs up."""
    app = web.Application()
    app.router.add_post("/check", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


def checked_at(port: int, token: str) -> dict[str, dict[str, str]]:
    """The ``producers`` setting of one producer ``order`` checked back at ``port``."""
    return {"order": {"check_url": f"http://127.0.0.1:{port}/check", "token": token}}
