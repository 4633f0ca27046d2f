"""The floor F: the CPU time of one bare HTTP round trip on this machine, measured in the
same run as the figures it scales.

A FastAPI route taking a small pydantic body, served by uvicorn as ``reliable-msg
serve`` serves the API (uvloop, uvicorn's default HTTP implementation, log level warning,
no access log), in a process of its own; called by an aiohttp client in another process
with ``in_flight`` requests in flight, its session made as the SDK's (a timeout, the
default connector, a bearer token, the answer read and parsed). After a warm-up, F is the
user + system CPU time of both processes over the measured requests, per request.

Every CPU-per-message figure is then also printed as a multiple of F: two HTTP calls per
message (the producer's prepare and confirm; the consumer's acks go in batches) cost 2 F
whatever the machine.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from pydantic import BaseModel

from reliable_msg.errors import ReliableMsgError
from reliable_msg.harness.ports import free_port
from reliable_msg.harness.process import stop_gracefully, wait_ready
from reliable_msg.tools.bench import e2e
from reliable_msg.tools.bench.cpu import CpuWatch

#: The route the client calls, and the token it sends (the route does not check it).
PATH = "/v1/messages"
TOKEN = "floor"
#: The client's request timeout, as the SDK's default.
TIMEOUT = 10.0
#: The groups of the floor's CPU time: the two processes; F is their sum.
CPU_GROUPS = ("server", "client")


class FloorFailed(ReliableMsgError):
    """The floor's client or server stopped before the measurement was done."""


class Body(BaseModel):
    topic: str
    payload: dict[str, Any]


class Answer(BaseModel):
    id: str
    status: str


def app() -> Any:
    """The bare route (and the ``/readyz`` the harness waits for)."""
    from fastapi import FastAPI

    api = FastAPI()

    @api.post(PATH)
    async def prepare(body: Body) -> Answer:
        return Answer(id=f"{body.topic}-{body.payload.get('n', 0)}", status="prepared")

    @api.get("/readyz")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    return api


async def serve(port: int) -> None:
    """Serve :func:`app` on 127.0.0.1:``port`` until SIGTERM, uvicorn configured as
    ``reliable-msg serve`` configures it (the bench's service runs at log level warning)."""
    import uvicorn

    config = uvicorn.Config(
        app(),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    await uvicorn.Server(config).serve()


async def call(url: str, warm_up: int, requests: int, in_flight: int) -> None:
    """The client's side: ``warm_up`` calls, ``warm`` on stdout, a line from stdin,
    ``requests`` calls, ``done`` on stdout, a line from stdin."""
    loop = asyncio.get_running_loop()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session:

        async def calls(count: int) -> None:
            numbers = iter(range(count))

            async def lane() -> None:
                for n in numbers:  # shared by the lanes: each number called once
                    body = {"topic": "bench.paid", "payload": {"n": n, "amount": "19.90"}}
                    async with session.post(url + PATH, json=body, headers=headers) as answer:
                        raw = await answer.read()
                        if answer.status != 200:
                            raise FloorFailed(f"the floor's route answered HTTP {answer.status}")
                    json.loads(raw)

            await asyncio.gather(*(lane() for _ in range(in_flight)))

        await calls(warm_up)
        print("warm", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
        await calls(requests)
        print("done", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)


@dataclass
class Floor:
    requests: int
    in_flight: int
    elapsed: float
    #: CPU seconds of :data:`CPU_GROUPS` and the machine's (see :mod:`.cpu`).
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def ms_per_request(self) -> float:
        """F: the client's and the server's CPU milliseconds per request."""
        return sum(self.cpu.get(g, 0.0) for g in CPU_GROUPS) / self.requests * 1000

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "in_flight": self.in_flight,
            "seconds": round(self.elapsed, 3),
            "requests_per_s": round(self.requests / self.elapsed, 1),
            "ms_per_request": round(self.ms_per_request, 4),
            "cpu_ms_per_request": {
                group: round(self.cpu[group] / self.requests * 1000, 4)
                for group in (*CPU_GROUPS, "machine")
                if group in self.cpu
            },
            "machine_busy": round(self.cpu["machine"] / self.cpu["capacity"], 3)
            if self.cpu.get("capacity")
            else None,
        }


async def measure(*, requests: int, warm_up: int = 500, in_flight: int = 32) -> Floor:
    """Serve and call the bare route, each in a process of its own; their CPU time over
    ``requests`` calls after ``warm_up`` calls."""
    if requests < 1 or warm_up < 0 or in_flight < 1:
        raise ValueError(f"floor: requests {requests}, warm-up {warm_up}, in flight {in_flight}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = await e2e._worker("floor-serve", {"port": port})
    client: asyncio.subprocess.Process | None = None
    watch = CpuWatch()
    try:
        await wait_ready(url, within=e2e.STARTUP)
        spec = {"url": url, "warm_up": warm_up, "requests": requests, "in_flight": in_flight}
        client = await e2e._worker("floor-call", spec, stdout=True, stdin=True)
        await _expect(client, "warm")
        await watch.start({server.pid: "server", client.pid: "client"})
        started = time.perf_counter()
        await _tell(client)
        await _expect(client, "done")
        elapsed = time.perf_counter() - started
        cpu = await watch.stop()  # both processes still alive: every tick counted
        await _tell(client)
    finally:
        await watch.close()
        await stop_gracefully(*(p for p in (client, server) if p is not None), grace=e2e.GRACE)
    if server.returncode not in (0, -15):
        raise FloorFailed(f"the floor's server exited with status {server.returncode}")
    return Floor(requests, in_flight, elapsed, cpu)


async def _expect(client: asyncio.subprocess.Process, word: str) -> None:
    assert client.stdout is not None
    line = (await client.stdout.readline()).decode().strip()
    if line != word:
        code = await client.wait() if not line else None
        raise FloorFailed(
            f"the floor's client said {line!r}, not {word!r}"
            + (f" (exited with status {code})" if code is not None else "")
        )


async def _tell(client: asyncio.subprocess.Process) -> None:
    assert client.stdin is not None
    client.stdin.write(b"go\n")
    await client.stdin.drain()
