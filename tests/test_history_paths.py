"""A message's history lists every move of every path, in order, whatever the store
writes for it: real messages go through each path (the happy one with three groups,
cancel, check-back commit, rollback and exhaustion, a refused publish, redelivery, a
dead delivery, requeue of each kind) and their histories are compared entry by entry.
Also: rows an older version wrote (a 'prepare', 'confirm' or 'ack' row of its own) are
not shown twice."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest

from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from tests.conftest import ADMIN, GROUP_TOKENS, PRODUCER, auth
from tests.helpers.checkback import ProducerEndpoint, checked_at
from tests.helpers.waiting import wait_until

PAID = ("inventory", "credit", "wms")  # order.paid's groups; order.refunded: credit only
NOT_ACKED = "not acked by wms after 2 deliveries"


class Starting:
    """A reason that starts with ``prefix`` (the rest is the broker's or producer's)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and other.startswith(self.prefix)

    def __repr__(self) -> str:
        return f"{self.prefix!r}..."


PREPARE = (None, None, "pending", "prepare")
CONFIRM = (None, "pending", "sent", "confirm")
FINISH = (None, "sent", "done", "last delivery acked")


def ack(group: str) -> tuple[str, str, str, str]:
    return (group, "sent", "done", "ack")


@pytest.fixture
def settings(
    make_settings: Callable[..., Settings], endpoint: tuple[ProducerEndpoint, int]
) -> Settings:
    _, port = endpoint
    return make_settings(
        max_refusals=1,
        producers=checked_at(port, PRODUCER),
        checkback={"after": 0.1, "max_tries": 2, "backoff_base": 0.1, "lease": 1.5},
        redelivery={"ack_timeout": 0.2, "jitter": 0.0, "max_attempts": 2, "backoff_cap": 0.2},
    )


async def history(runtime: Runtime, db: asyncpg.Connection, id: str) -> list[Any]:
    """The history as its moves; checks its times run forward and that each move the
    rows record shows the row's time."""
    moves = await runtime.usecases.history(id)
    times = [t.at for t in moves]
    assert times == sorted(times), moves
    m = await db.fetchrow(
        "SELECT created_at, sent_at, finished_at FROM rmsg_message WHERE id = $1", id
    )
    if m is None:
        return moves
    recorded = {
        "prepare": m["created_at"],
        "confirm": m["sent_at"],
        "last delivery acked": m["finished_at"],
    }
    for t in moves:
        if t.reason in recorded:
            assert t.at == recorded[t.reason], (t, m)
        if t.reason == "ack":
            done_at = await db.fetchval(
                "SELECT done_at FROM rmsg_delivery WHERE message_id = $1 AND group_name = $2",
                id,
                t.group_name,
            )
            assert t.at == done_at, t
    return [(t.group_name, t.from_status, t.to_status, t.reason) for t in moves]


async def prepare(client: httpx.AsyncClient, id: str, topic: str = "order.paid") -> None:
    body = {"id": id, "topic": topic, "payload": {"id": id}}
    r = await client.post("/v1/messages", json=body, headers=auth(PRODUCER))
    assert r.status_code == 201, r.text


async def confirm(client: httpx.AsyncClient, id: str) -> httpx.Response:
    return await client.post(f"/v1/messages/{id}/confirm", headers=auth(PRODUCER))


async def acked(client: httpx.AsyncClient, id: str, group: str) -> None:
    r = await client.post(f"/v1/messages/{id}/ack", headers=auth(GROUP_TOKENS[group]))
    assert r.status_code == 200, r.text


async def requeue(client: httpx.AsyncClient, id: str) -> None:
    r = await client.post(f"/v1/messages/{id}/requeue", headers=auth(ADMIN))
    assert r.status_code == 200, r.text


async def status(db: asyncpg.Connection, id: str) -> str:
    return str(await db.fetchval("SELECT status FROM rmsg_message WHERE id = $1", id))


async def checked_until(runtime: Runtime, db: asyncpg.Connection, id: str, want: str) -> None:
    async def reached() -> bool:
        await runtime.checkback.run_once()
        return await status(db, id) == want

    await wait_until(reached, within=15, every=0.05)


async def redelivered_until(runtime: Runtime, db: asyncpg.Connection, done: str) -> None:
    """Redelivery passes until ``done`` (SQL over rmsg_delivery) holds."""

    async def reached() -> bool:
        await runtime.redelivery.run_once()
        return bool(await db.fetchval(done))

    await wait_until(reached, within=15, every=0.05)


async def test_the_happy_path_cancel_and_check_back_answers(
    client: httpx.AsyncClient,
    runtime: Runtime,
    db: asyncpg.Connection,
    endpoint: tuple[ProducerEndpoint, int],
) -> None:
    producer, _ = endpoint
    await prepare(client, "h-1")
    assert (await confirm(client, "h-1")).status_code == 200
    for group in PAID:
        await acked(client, "h-1", group)
    assert await history(runtime, db, "h-1") == [
        PREPARE,
        CONFIRM,
        *(ack(g) for g in PAID),
        FINISH,
    ]
    # None of these moves wrote a row: the message's rows record them.
    written = "SELECT count(*) FROM rmsg_transition WHERE message_id = 'h-1'"
    assert await db.fetchval(written) == 0

    await prepare(client, "c-1")
    r = await client.post("/v1/messages/c-1/cancel", headers=auth(PRODUCER))
    assert r.status_code == 200, r.text
    assert await history(runtime, db, "c-1") == [PREPARE, (None, "pending", "cancelled", "cancel")]

    producer.answers.update({"cb-commit": "committed", "cb-rollback": "rolled_back"})
    await prepare(client, "cb-commit", "order.refunded")
    await prepare(client, "cb-rollback")
    await checked_until(runtime, db, "cb-commit", "sent")
    await checked_until(runtime, db, "cb-rollback", "cancelled")
    await acked(client, "cb-commit", "credit")
    assert await history(runtime, db, "cb-commit") == [
        PREPARE,
        (None, "pending", "sent", "check-back: committed"),
        ack("credit"),
        FINISH,
    ]
    assert await history(runtime, db, "cb-rollback") == [
        PREPARE,
        (None, "pending", "cancelled", "check-back: rolled back"),
    ]
    assert await runtime.usecases.history("never-prepared") == []


async def test_check_back_exhausted_then_requeued_and_confirmed(
    client: httpx.AsyncClient, runtime: Runtime, db: asyncpg.Connection
) -> None:
    await prepare(client, "cb-dead", "order.refunded")
    await checked_until(runtime, db, "cb-dead", "dead")
    await requeue(client, "cb-dead")
    assert (await confirm(client, "cb-dead")).status_code == 200
    await acked(client, "cb-dead", "credit")
    assert await history(runtime, db, "cb-dead") == [
        PREPARE,
        (None, "pending", "dead", Starting("check-back exhausted: ")),
        (None, "dead", "pending", "requeue: check-back starts again"),
        CONFIRM,
        ack("credit"),
        FINISH,
    ]


async def test_a_refused_publish_then_requeued_and_checked_back(
    client: httpx.AsyncClient,
    runtime: Runtime,
    settings: Settings,
    db: asyncpg.Connection,
    amqp: aio_pika.abc.AbstractConnection,
    endpoint: tuple[ProducerEndpoint, int],
) -> None:
    """order.created goes to credit alone: without its queue, RabbitMQ refuses it."""
    producer, _ = endpoint
    async with amqp.channel() as channel:
        await channel.queue_delete(settings.queue_name("credit"))
    producer.answers["r-1"] = "committed"
    await prepare(client, "r-1", "order.created")
    await checked_until(runtime, db, "r-1", "dead")
    # The refusal declared the topology again: this time the publish is taken.
    await requeue(client, "r-1")
    await checked_until(runtime, db, "r-1", "sent")
    await acked(client, "r-1", "credit")
    assert await history(runtime, db, "r-1") == [
        PREPARE,
        (None, "pending", "dead", Starting("")),
        (None, "dead", "pending", "requeue: check-back starts again"),
        (None, "pending", "sent", "check-back: committed"),
        ack("credit"),
        FINISH,
    ]


async def test_redelivery_a_dead_delivery_an_ack_while_dead_and_requeue(
    client: httpx.AsyncClient, runtime: Runtime, db: asyncpg.Connection
) -> None:
    await prepare(client, "d-1")
    assert (await confirm(client, "d-1")).status_code == 200
    await acked(client, "d-1", "inventory")
    # credit's consumer is slow: its delivery is not due while wms's runs out.
    await db.execute(
        "UPDATE rmsg_delivery SET next_attempt_at = now() + interval '1 hour'"
        " WHERE message_id = 'd-1' AND group_name = 'credit'"
    )
    wms = "SELECT {} FROM rmsg_delivery WHERE message_id = 'd-1' AND group_name = 'wms'"
    await redelivered_until(runtime, db, wms.format("attempts = 2"))
    await redelivered_until(runtime, db, wms.format("status = 'dead'"))
    assert await status(db, "d-1") == "dead"
    await acked(client, "d-1", "credit")
    await requeue(client, "d-1")
    await acked(client, "d-1", "wms")
    assert await status(db, "d-1") == "done"
    assert await history(runtime, db, "d-1") == [
        PREPARE,
        CONFIRM,
        ack("inventory"),
        ("wms", "sent", "sent", "redelivered, attempt 2"),
        ("wms", "sent", "dead", NOT_ACKED),
        (None, "sent", "dead", NOT_ACKED),
        ack("credit"),
        ("wms", "dead", "sent", "requeue"),
        (None, "dead", "sent", "requeue"),
        ack("wms"),
        FINISH,
    ]


async def test_rows_an_older_version_wrote_are_shown_once(
    client: httpx.AsyncClient, runtime: Runtime, db: asyncpg.Connection
) -> None:
    """Before this version every move had its row: a message half moved by it (prepared,
    confirmed and acked by inventory) and one moved wholly by it show the same history
    as one moved by this version alone."""
    expected = [PREPARE, CONFIRM, *(ack(g) for g in PAID), FINISH]
    for id in ("old-half", "old-whole"):
        await prepare(client, id)
        assert (await confirm(client, id)).status_code == 200
        for group in PAID:
            await acked(client, id, group)
    half = await runtime.usecases.history("old-half")
    whole = await runtime.usecases.history("old-whole")
    for id, written in (("old-half", half[:3]), ("old-whole", whole)):
        for t in written:  # as the older version wrote them, in its order
            await db.execute(
                "INSERT INTO rmsg_transition"
                " (message_id, group_name, from_status, to_status, at, reason)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                id,
                t.group_name,
                t.from_status,
                t.to_status,
                t.at,
                t.reason,
            )
        assert await history(runtime, db, id) == expected, id
    assert await runtime.usecases.history("old-half") == half
    assert await runtime.usecases.history("old-whole") == whole
