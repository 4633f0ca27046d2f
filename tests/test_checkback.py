"""Check-back of pending messages against a real HTTP endpoint of the producer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import aio_pika
import asyncpg
import httpx
import pytest
from aiohttp import web

from reliable_msg.service.api import create_app
from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from tests.conftest import OTHER_PRODUCER, PRODUCER, auth
from tests.helpers import rabbit
from tests.helpers.checkback import ProducerEndpoint, checked_at, serving_endpoint
from tests.helpers.service import remove_traces, running, write_config
from tests.helpers.waiting import wait_until

CHECK_MAX = 3


class StalledEndpoint:
    """A producer's check-back endpoint that reads each request and never answers: it
    holds the connection open until the caller gives up (or ``release`` is set)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.received = 0
        self.holding = 0  #: requests whose caller still waits for the answer
        self.ended = 0  #: requests the caller gave up on (or that were answered)

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.received += 1
        self.holding += 1
        try:
            await self.release.wait()
        finally:  # also when the caller hung up: the handler is cancelled then
            self.holding -= 1
            self.ended += 1
        return web.json_response({"status": "unknown"})


@pytest.fixture
def settings(
    make_settings: Callable[..., Settings], endpoint: tuple[ProducerEndpoint, int]
) -> Settings:
    _, port = endpoint
    return make_settings(
        producers=checked_at(port, PRODUCER),
        checkback={"max_tries": CHECK_MAX, "timeout": 0.5},
    )


async def prepare(client: httpx.AsyncClient, id: str, token: str = PRODUCER) -> None:
    body = {"id": id, "topic": "order.paid", "payload": {"order_id": id}}
    r = await client.post("/v1/messages", json=body, headers=auth(token))
    assert r.status_code == 201, r.text


async def statuses(db: asyncpg.Connection) -> dict[str, str]:
    rows = await db.fetch("SELECT id, status FROM rmsg_message")
    return {r["id"]: r["status"] for r in rows}


async def test_check_back_outcomes(
    client: httpx.AsyncClient,
    runtime: Runtime,
    settings: Settings,
    endpoint: tuple[ProducerEndpoint, int],
    amqp: aio_pika.abc.AbstractConnection,
    db: asyncpg.Connection,
) -> None:
    producer, _ = endpoint
    producer.answers = {
        "committed": "committed",
        "rolled-back": "rolled_back",
        "unknown": "unknown",
        "hang": "hang",
        "error": "error",
    }
    for id in producer.answers:
        await prepare(client, id)
    assert set((await statuses(db)).values()) == {"pending"}

    async def settled() -> bool:
        await runtime.checkback.run_once()
        return "pending" not in (await statuses(db)).values()

    await wait_until(settled, within=20, every=0.05)

    assert await statuses(db) == {
        "committed": "sent",
        "rolled-back": "cancelled",
        "unknown": "dead",
        "hang": "dead",
        "error": "dead",
    }
    assert producer.calls["committed"] == 1
    assert producer.calls["rolled-back"] == 1
    for id in ("unknown", "hang", "error"):
        assert producer.calls[id] == CHECK_MAX, id
    dead = await db.fetch(
        "SELECT id, check_attempts, last_error FROM rmsg_message WHERE status = 'dead'"
    )
    assert {r["id"]: r["check_attempts"] for r in dead} == {
        "unknown": CHECK_MAX,
        "hang": CHECK_MAX,
        "error": CHECK_MAX,
    }
    reasons = {r["id"]: r["last_error"] for r in dead}
    assert "unknown" in reasons["unknown"]
    assert "HTTP 500" in reasons["error"]
    assert "failed" in reasons["hang"]

    # The check-back carried the producer's token and the message facts.
    authorization, body = producer.seen[0]
    assert authorization == f"Bearer {PRODUCER}"
    assert set(body) == {"id", "topic", "created_at"}

    [message] = await rabbit.drain(amqp, settings.queue_name("inventory"), wait=0.3)
    assert message.message_id == "committed"
    assert json.loads(message.body) == {"order_id": "committed"}


#: Tries of the backoff test: enough for the wait to double twice, then reach its cap.
BACKOFF_TRIES = 5


async def test_check_back_waits_longer_after_each_unanswered_try(
    make_settings: Callable[..., Settings],
    endpoint: tuple[ProducerEndpoint, int],
    db: asyncpg.Connection,
) -> None:
    """The next check-back of a message that got no answer is due ``backoff_base`` later,
    twice that after the next try, and so on up to ``backoff_cap``: read from the row
    that each try leaves behind (its next check and the time it was recorded)."""
    producer, port = endpoint
    producer.answers = {"slow": "unknown"}
    settings = make_settings(
        producers=checked_at(port, PRODUCER),
        checkback={
            "max_tries": BACKOFF_TRIES,
            "timeout": 0.5,
            "backoff_base": 0.1,
            "backoff_factor": 2.0,
            "backoff_cap": 0.5,
        },
    )
    runtime = await Runtime.create(settings, scanners=False)
    await runtime.start()
    try:
        transport = httpx.ASGITransport(app=create_app(runtime))
        async with httpx.AsyncClient(transport=transport, base_url="http://rmsg") as client:
            await prepare(client, "slow")

        async def row() -> asyncpg.Record:
            record = await db.fetchrow(
                "SELECT status, check_attempts,"
                " extract(epoch FROM next_check_at - updated_at) AS wait"
                " FROM rmsg_message WHERE id = 'slow'"
            )
            assert record is not None
            return record

        async def asked() -> bool:
            return await runtime.checkback.run_once() == 1

        waits: list[float] = []
        for tries in range(1, BACKOFF_TRIES + 1):
            await wait_until(asked, within=10, every=0.02)  # due again: a call is under way

            async def recorded(tries: int = tries) -> bool:
                return bool((await row())["check_attempts"] == tries)

            # No pass runs meanwhile, so nothing claims the row before it is read.
            await wait_until(recorded, within=10, every=0.02)
            current = await row()
            if current["status"] == "pending":
                waits.append(float(current["wait"]))
    finally:
        await runtime.stop()
        await remove_traces(settings)

    assert waits == pytest.approx([0.1, 0.2, 0.4, 0.5])
    assert current["status"] == "dead"
    assert producer.calls["slow"] == BACKOFF_TRIES


async def test_check_back_waits_for_check_after(
    client: httpx.AsyncClient,
    runtime: Runtime,
    endpoint: tuple[ProducerEndpoint, int],
    db: asyncpg.Connection,
) -> None:
    producer, _ = endpoint
    producer.answers = {"young": "committed"}
    await prepare(client, "young")
    assert await runtime.checkback.run_once() == 0  # younger than checkback.after
    await asyncio.sleep(0.3)
    assert await runtime.checkback.run_once() == 1  # the pass started the call, and returned

    async def sent() -> bool:
        return (await statuses(db))["young"] == "sent"

    await wait_until(sent, within=10, every=0.05)


async def test_requeue_of_check_back_dead_message_asks_the_producer_again(
    client: httpx.AsyncClient,
    runtime: Runtime,
    endpoint: tuple[ProducerEndpoint, int],
    db: asyncpg.Connection,
) -> None:
    from tests.conftest import ADMIN

    producer, _ = endpoint
    producer.answers = {"late": "unknown"}
    await prepare(client, "late")

    async def dead() -> bool:
        await runtime.checkback.run_once()
        return (await statuses(db))["late"] == "dead"

    await wait_until(dead, within=10, every=0.05)
    r = await client.post("/v1/messages/late/requeue", headers=auth(ADMIN))
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "pending"
    assert r.json()["check_attempts"] == 0

    producer.answers["late"] = "committed"

    async def sent() -> bool:
        await runtime.checkback.run_once()
        return (await statuses(db))["late"] == "sent"

    await wait_until(sent, within=10, every=0.05)


#: Check-back calls one instance holds open to one producer, in the stalled-endpoint test.
PER_PRODUCER = 2


async def test_a_stalled_check_back_endpoint_does_not_delay_other_producers(
    make_settings: Callable[..., Settings], db: asyncpg.Connection, tmp_path: Path
) -> None:
    stalled = StalledEndpoint()
    healthy = ProducerEndpoint()
    stalled_ids = [f"stalled-{i}" for i in range(5)]
    healthy_ids = [f"healthy-{i}" for i in range(6)]
    healthy.answers = dict.fromkeys(healthy_ids, "committed")

    async def all_healthy_sent() -> bool:
        current = await statuses(db)
        return all(current.get(id) == "sent" for id in healthy_ids)

    async with (
        serving_endpoint(stalled.handle) as stalled_port,
        serving_endpoint(healthy.handle) as healthy_port,
    ):
        settings = make_settings(
            producers={
                "order": {"check_url": f"http://127.0.0.1:{healthy_port}/check", "token": PRODUCER},
                "other": {
                    "check_url": f"http://127.0.0.1:{stalled_port}/check",
                    "token": OTHER_PRODUCER,
                },
            },
            checkback={"timeout": 30.0, "concurrency": 4, "per_producer": PER_PRODUCER},
        )
        config = write_config(settings, tmp_path / "config.toml")
        try:
            with running(config, tmp_path) as [instance]:
                async with httpx.AsyncClient(base_url=instance.url) as client:
                    for id in stalled_ids:
                        await prepare(client, id, OTHER_PRODUCER)
                    # A pass has claimed the stalled producer's messages; their calls hang.
                    await wait_until(lambda: stalled.holding == PER_PRODUCER, within=20)
                    for id in healthy_ids:
                        await prepare(client, id, PRODUCER)
                    await wait_until(all_healthy_sent, within=20)
                    # Every healthy message was asked and published while the stalled
                    # calls were still held open: none of them had ended yet.
                    assert stalled.ended == 0
                    assert stalled.holding == stalled.received == PER_PRODUCER
                    assert all(healthy.calls[id] == 1 for id in healthy_ids)
            # The instance stopped cleanly, hanging up on the calls still in flight.
            log = instance.log.read_text()
            assert "Application shutdown complete" in log, log[-3000:]
            assert "Traceback" not in log, log[-3000:]
            assert log.count("stopped at shutdown") == PER_PRODUCER, log[-3000:]
        finally:
            stalled.release.set()
            await remove_traces(settings)

    rows = await db.fetch("SELECT id, status, check_attempts FROM rmsg_message")
    states = {r["id"]: (r["status"], r["check_attempts"]) for r in rows}
    # A call cut short by shutdown is no try: the message waits for its lease, untouched.
    assert {states[id] for id in stalled_ids} == {("pending", 0)}
    assert {states[id][0] for id in healthy_ids} == {"sent"}
