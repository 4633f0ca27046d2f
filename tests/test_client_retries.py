"""The SDKs' HTTP client against real sockets: a service answering 503 for a while, one
not listening yet, and one that never comes back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
from aiohttp import web

from reliable_msg.errors import ServiceUnavailable, StoreError
from reliable_msg.harness.ports import free_port
from reliable_msg.sdk.client import RetryPolicy, ServiceClient

#: Quick retries; enough of them that a few failures never exhaust them.
PATIENT = RetryPolicy(attempts=50, initial=0.02, max_wait=0.1, deadline=30.0)
#: Three tries at most.
THREE = RetryPolicy(attempts=3, initial=0.01, max_wait=0.02, deadline=30.0)

Answer = Callable[[int], web.Response]


@asynccontextmanager
async def service(port: int, answer: Answer) -> AsyncIterator[list[str]]:
    """A stand-in service on ``port``: its n-th request (from 1) gets ``answer(n)``;
    yields the paths requested so far."""
    requested: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        requested.append(request.path)
        return answer(len(requested))

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield requested
    finally:
        await runner.cleanup()


def confirmed(n: int) -> web.Response:
    return web.json_response({"id": "m-1", "status": "sent"})


def unavailable_until(ok_from: int) -> Answer:
    """503 with the service's error body, then 200 from the ``ok_from``-th request."""

    def answer(n: int) -> web.Response:
        if n < ok_from:
            error = {"code": "store_unavailable", "message": "PostgreSQL is down"}
            return web.json_response({"error": error}, status=503)
        return confirmed(n)

    return answer


def bare_503(n: int) -> web.Response:
    """What a proxy in front of a stopped service answers: 503, no JSON."""
    return web.Response(status=503, text="Service Unavailable")


async def test_503s_are_retried_until_the_service_answers() -> None:
    port = free_port()
    async with (
        service(port, unavailable_until(4)) as requested,
        ServiceClient(f"http://127.0.0.1:{port}", "t", retry=PATIENT) as client,
    ):
        assert await client.confirm("m-1") == {"id": "m-1", "status": "sent"}
    assert requested == ["/v1/messages/m-1/confirm"] * 4


async def test_a_refused_connection_is_retried_until_the_service_listens() -> None:
    port = free_port()  # nothing listens there yet
    client = ServiceClient(f"http://127.0.0.1:{port}", "t", retry=PATIENT)
    try:
        call = asyncio.create_task(client.confirm("m-1"))
        await asyncio.sleep(0.5)  # several refused tries
        assert not call.done(), "gave up on a refused connection"
        async with service(port, confirmed) as requested:
            assert await asyncio.wait_for(call, 20) == {"id": "m-1", "status": "sent"}
        assert requested == ["/v1/messages/m-1/confirm"]
    finally:
        await client.close()


async def test_a_service_that_never_listens_raises_service_unavailable() -> None:
    port = free_port()
    async with ServiceClient(f"http://127.0.0.1:{port}", "t", retry=THREE) as client:
        with pytest.raises(ServiceUnavailable, match="confirm"):
            await client.confirm("m-1")


async def test_503s_past_the_retries_raise_typed_errors() -> None:
    port = free_port()
    async with ServiceClient(f"http://127.0.0.1:{port}", "t", retry=THREE) as client:
        async with service(port, bare_503) as requested:
            with pytest.raises(ServiceUnavailable):
                await client.confirm("m-1")
        assert len(requested) == 3
        async with service(port, unavailable_until(10)) as requested:
            with pytest.raises(StoreError, match="PostgreSQL is down"):
                await client.confirm("m-1")
        assert len(requested) == 3
