"""Group commit keeps every guarantee of DESIGN §3, over real PostgreSQL, RabbitMQ and
HTTP: the service runs with a window of a second, so that calls sent together are known
to share one run, and each test checks that they did (``rmsg_group_commit_messages`` of
``/metrics``: one more run, of as many messages as were sent).

- a publish RabbitMQ refuses inside a shared confirm leaves only its message ``pending``;
- a shared confirm whose transaction dies (its backend terminated while it waits on a
  lock, or killed at COMMIT after the publishes) fails every caller and writes nothing;
  one that fails for one message's sake (a constraint raising at COMMIT) is run again
  call by call, and only that call fails;
- a ``serve`` process SIGKILLed with prepares and confirms waiting in its window loses
  nothing: once restarted, check-back asks the producer's endpoint and every message
  committed locally is delivered and handled once, the others cancelled;
- batch and single calls share a window, two prepares of one id never both create it,
  concurrent confirms of one id publish it once, two groups' acks run apart, bad calls
  fail alone, and ``enabled = false`` answers the same.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from reliable_msg.harness.ports import free_port
from reliable_msg.harness.process import serve_argv, stop, wait_ready
from reliable_msg.sdk import consumer as consumer_sdk
from reliable_msg.sdk import producer as producer_sdk
from reliable_msg.sdk.client import RetryPolicy
from reliable_msg.sdk.consumer import Consumer, Received
from reliable_msg.sdk.producer import MARKER_TABLE, check_back_router
from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from tests.conftest import AMQP_URL, GROUP_TOKENS, OTHER_PRODUCER, PRODUCER, auth
from tests.helpers import tables
from tests.helpers.checkback import ProducerEndpoint, checked_at
from tests.helpers.servers import serving_app
from tests.helpers.service import (
    GRACE,
    STARTUP,
    Instance,
    remove_traces,
    running_async,
    write_config,
)
from tests.helpers.waiting import wait_until

#: The window of these tests (the longest the settings take): calls sent together
#: arrive well within it, so they share one run.
WINDOW = 1.0
AUDIT_TOKEN = "audit-token"
FAST = RetryPolicy(attempts=3, initial=0.05, max_wait=0.2, deadline=5.0)


@pytest.fixture(params=[True], ids=["on"])
def enabled(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def settings(
    make_settings: Callable[..., Settings],
    endpoint: tuple[ProducerEndpoint, int],
    enabled: bool,
) -> Settings:
    _, port = endpoint
    return make_settings(
        producers=checked_at(port, PRODUCER),
        # audit.done: only the audit group takes it, so deleting its queue makes the
        # publish unroutable while order.paid still routes.
        groups={"audit": {"topics": ["audit.done"], "token": AUDIT_TOKEN}},
        group_commit={"enabled": enabled, "window": WINDOW, "max_running": 4},
        checkback={"after": 0.2, "timeout": 1.0, "lease": 1.5},
    )


@pytest.fixture
async def http(service_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=service_url, timeout=30.0) as client:
        yield client


class Runs:
    """``rmsg_group_commit_messages`` of one op read from ``/metrics``: shared runs and
    the messages in them since the snapshot was taken."""

    def __init__(self, http: httpx.AsyncClient, op: str) -> None:
        self._http = http
        self._op = op
        self._base = (0.0, 0.0)

    async def _now(self) -> tuple[float, float]:
        text = (await self._http.get("/metrics")).text
        count = total = 0.0
        for family in text_string_to_metric_families(text):
            if family.name != "rmsg_group_commit_messages":
                continue
            for s in family.samples:
                if s.labels.get("op") != self._op:
                    continue
                if s.name.endswith("_count"):
                    count = s.value
                elif s.name.endswith("_sum"):
                    total = s.value
        return count, total

    async def start(self) -> Runs:
        self._base = await self._now()
        return self

    async def since(self) -> tuple[int, int]:
        """(runs, messages) since :meth:`start`."""
        count, total = await self._now()
        return int(count - self._base[0]), int(total - self._base[1])


async def runs(http: httpx.AsyncClient, op: str) -> Runs:
    return await Runs(http, op).start()


def body(id: str, topic: str = "order.paid", n: int = 1) -> dict[str, Any]:
    return {"id": id, "topic": topic, "payload": {"n": n}}


async def prepare(http: httpx.AsyncClient, *messages: dict[str, Any]) -> None:
    r = await http.post(
        "/v1/batch/prepare", json={"messages": list(messages)}, headers=auth(PRODUCER)
    )
    assert r.status_code == 200, r.text
    assert all(i["created"] for i in r.json()["results"]), r.text


async def confirm(http: httpx.AsyncClient, id: str, token: str = PRODUCER) -> httpx.Response:
    return await http.post(f"/v1/messages/{id}/confirm", headers=auth(token))


def code(r: httpx.Response) -> str:
    """The error code of an error answer."""
    return str(r.json()["error"]["code"])


async def statuses(db: asyncpg.Connection, ids: list[str]) -> dict[str, str]:
    rows = await db.fetch("SELECT id, status FROM rmsg_message WHERE id = ANY($1::text[])", ids)
    return {r["id"]: r["status"] for r in rows}


async def deliveries(db: asyncpg.Connection, ids: list[str]) -> dict[str, list[str]]:
    rows = await db.fetch(
        "SELECT message_id, group_name FROM rmsg_delivery WHERE message_id = ANY($1::text[])"
        " ORDER BY group_name",
        ids,
    )
    found: dict[str, list[str]] = {id: [] for id in ids}
    for r in rows:
        found[r["message_id"]].append(r["group_name"])
    return found


async def queued(amqp: aio_pika.abc.AbstractConnection, queue: str) -> list[str]:
    """The ids of every message now in ``queue`` (taken off it), in order."""
    channel = await amqp.channel()
    q = await channel.get_queue(queue, ensure=True)
    ids = []
    while (message := await q.get(no_ack=True, fail=False)) is not None:
        assert message.message_id is not None
        ids.append(message.message_id)
    await channel.close()
    return ids


async def depth(amqp: aio_pika.abc.AbstractConnection, queue: str) -> int:
    async with amqp.channel() as channel:
        q = await channel.declare_queue(queue, passive=True)
        return int(q.declaration_result.message_count or 0)


# -- 1. a refused publish in a shared confirm ---------------------------------------------


async def test_a_refused_publish_in_a_shared_confirm_leaves_only_its_message_pending(
    http: httpx.AsyncClient,
    settings: Settings,
    db: asyncpg.Connection,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    good = [f"ok-{n}" for n in range(4)]
    await prepare(http, *(body(id) for id in good), body("lost", "audit.done"))
    audit = settings.queue_name("audit")
    async with amqp.channel() as channel:
        await channel.queue_delete(audit)  # what an operator's rabbitmqctl delete_queue does
    shared = await runs(http, "confirm")

    answers = await asyncio.gather(*(confirm(http, id) for id in [*good, "lost"]))

    assert await shared.since() == (1, 5)  # one run held the five
    *sent, lost = answers
    for r in sent:
        assert (r.status_code, r.json()["status"]) == (200, "sent"), r.text
    assert lost.status_code == 503, lost.text
    assert code(lost) == "unroutable", lost.text
    assert await statuses(db, [*good, "lost"]) == {**dict.fromkeys(good, "sent"), "lost": "pending"}
    assert await deliveries(db, [*good, "lost"]) == {
        **{id: ["credit", "inventory", "wms"] for id in good},
        "lost": [],
    }
    # Each taken message was published once; the refused one went nowhere.
    assert sorted(await queued(amqp, settings.queue_name("inventory"))) == good

    # It stays pending for its producer's next try (or check-back), which goes through
    # once the service has declared the queue again.
    async def taken() -> bool:
        r = await confirm(http, "lost")
        return r.status_code == 200 and r.json()["status"] == "sent"

    await wait_until(taken, within=15, every=0.3)
    assert await deliveries(db, ["lost"]) == {"lost": ["audit"]}
    assert await queued(amqp, audit) == ["lost"]


# -- 2. a commit failing under a shared statement -----------------------------------------


async def service_backends_waiting(db: asyncpg.Connection) -> list[int]:
    """The service's backends on the test database waiting for a lock."""
    rows = await db.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = 'reliable-msg' AND wait_event_type = 'Lock'"
    )
    return [r["pid"] for r in rows]


async def test_a_shared_confirm_whose_backend_dies_fails_every_caller_and_writes_nothing(
    http: httpx.AsyncClient,
    settings: Settings,
    db: asyncpg.Connection,
    database_url: str,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    ids = [f"cut-{n}" for n in range(4)]
    await prepare(http, *(body(id) for id in ids))
    shared = await runs(http, "confirm")
    holder = await asyncpg.connect(database_url)
    try:
        # The shared UPDATE waits on one row this connection holds: the run is open.
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM rmsg_message WHERE id = 'cut-2' FOR UPDATE")
        calls = asyncio.gather(*(confirm(http, id) for id in ids))
        await wait_until(lambda: _waiting(db, 1), within=15)
        [pid] = await service_backends_waiting(db)
        assert await shared.since() == (1, 4)
        assert await db.fetchval("SELECT pg_terminate_backend($1)", pid)
        answers = await calls
        await tx.rollback()
    finally:
        await holder.close()

    for r in answers:
        assert r.status_code == 503, r.text
        assert code(r) == "store_unavailable", r.text
    assert await statuses(db, ids) == dict.fromkeys(ids, "pending")
    assert await deliveries(db, ids) == {id: [] for id in ids}
    assert await depth(amqp, settings.queue_name("inventory")) == 0

    # The callers' next tries all go through, each message published once.
    again = await asyncio.gather(*(confirm(http, id) for id in ids))
    assert [r.json()["status"] for r in again] == ["sent"] * 4, [r.text for r in again]
    assert sorted(await queued(amqp, settings.queue_name("inventory"))) == ids


async def deferred_trigger(db: asyncpg.Connection, body_sql: str) -> None:
    """A trigger run at COMMIT for each row moved to ``sent`` whose id starts with
    ``gc-``: ``body_sql`` is its PL/pgSQL body."""
    await db.execute(
        f"""
        CREATE FUNCTION gc_test_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN {body_sql} RETURN NULL; END $$;
        CREATE CONSTRAINT TRIGGER gc_test_at_commit AFTER UPDATE ON rmsg_message
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
        WHEN (NEW.status = 'sent' AND NEW.id LIKE 'gc-%')
        EXECUTE FUNCTION gc_test_at_commit();
        """
    )


async def drop_trigger(db: asyncpg.Connection) -> None:
    await db.execute(
        "DROP TRIGGER IF EXISTS gc_test_at_commit ON rmsg_message;"
        " DROP FUNCTION IF EXISTS gc_test_at_commit()"
    )


@pytest.fixture
async def sdk_db(db: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    """The test database with the SDKs' tables and ``sdk_effects``, empty; and no test
    trigger left on ``rmsg_message`` whatever happens."""
    await producer_sdk.install(db)
    await consumer_sdk.install(db)
    await db.execute("CREATE TABLE IF NOT EXISTS sdk_effects (group_name text, message_id text)")
    await tables.empty(db, "sdk_effects", "rmsg_inbox", MARKER_TABLE)
    try:
        yield db
    finally:
        await drop_trigger(db)


def effects_consumer(
    url: str, settings: Settings, pool: asyncpg.Pool, group: str, topic: str
) -> Consumer:
    """A consumer of ``group`` whose handler of ``topic`` writes one ``sdk_effects`` row a
    message (a second row would be a second handling)."""
    consumer = Consumer(
        group,
        service_url=url,
        token=GROUP_TOKENS[group],
        amqp_url=AMQP_URL,
        pool=pool,
        queue=settings.queue_name(group),
        retry=FAST,
        ack_interval=0.05,
    )

    @consumer.handler(topic)
    async def effect(conn: asyncpg.Connection, message: Received) -> None:
        await conn.execute(
            "INSERT INTO sdk_effects (group_name, message_id) VALUES ($1, $2)", group, message.id
        )

    return consumer


async def _waiting(db: asyncpg.Connection, n: int) -> bool:
    return len(await service_backends_waiting(db)) == n


async def handled(db: asyncpg.Connection) -> list[str]:
    return sorted(r["message_id"] for r in await db.fetch("SELECT message_id FROM sdk_effects"))


async def test_a_shared_confirm_killed_at_commit_after_its_publishes_fails_every_caller(
    http: httpx.AsyncClient,
    service_url: str,
    settings: Settings,
    sdk_db: asyncpg.Connection,
    pool: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    """The publishes went out before the COMMIT died: the consumer gets those copies of
    messages still ``pending``; its acks are answered ``not_sent`` and tried again, and
    once the callers' next tries commit, each message is handled once."""
    ids = [f"gc-killed-{n}" for n in range(4)]
    await prepare(http, *(body(id) for id in ids))
    await deferred_trigger(sdk_db, "PERFORM pg_terminate_backend(pg_backend_pid());")
    shared = await runs(http, "confirm")

    answers = await asyncio.gather(*(confirm(http, id) for id in ids))

    await drop_trigger(sdk_db)
    assert await shared.since() == (1, 4)
    for r in answers:
        assert (r.status_code, code(r)) == (503, "store_unavailable"), r.text
    assert await statuses(sdk_db, ids) == dict.fromkeys(ids, "pending")
    assert await deliveries(sdk_db, ids) == {id: [] for id in ids}
    inventory = settings.queue_name("inventory")
    assert await depth(amqp, inventory) == 4  # published, then the COMMIT died

    consumer = effects_consumer(service_url, settings, pool, "inventory", "order.paid")
    task = asyncio.create_task(consumer.run(handle_signals=False))
    try:
        again = await asyncio.gather(*(confirm(http, id) for id in ids))
        assert [r.json()["status"] for r in again] == ["sent"] * 4, [r.text for r in again]

        async def all_done() -> bool:
            n = await sdk_db.fetchval(
                "SELECT count(*) FROM rmsg_delivery WHERE message_id = ANY($1::text[])"
                " AND group_name = 'inventory' AND status = 'done'",
                ids,
            )
            return bool(n == len(ids)) and await depth(amqp, inventory) == 0

        await wait_until(all_done, within=30, every=0.2)
    finally:
        consumer.request_stop()
        await asyncio.wait_for(task, 30)
    assert await handled(sdk_db) == sorted(ids)


async def test_a_shared_confirm_failing_for_one_message_fails_only_its_caller(
    http: httpx.AsyncClient,
    runtime: Runtime,
    settings: Settings,
    endpoint: tuple[ProducerEndpoint, int],
    sdk_db: asyncpg.Connection,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    """Not an outage: the coalescer runs each call again on its own, and only the call of
    the message the constraint refuses fails. The others' publishes of the shared run
    are copies the consumers' inbox absorbs."""
    good = [f"gc-good-{n}" for n in range(3)]
    ids = [*good, "gc-guilty"]
    await prepare(http, *(body(id) for id in ids))
    await deferred_trigger(
        sdk_db,
        "IF NEW.id = 'gc-guilty' THEN RAISE EXCEPTION 'gc-guilty refused at commit'; END IF;",
    )
    shared = await runs(http, "confirm")

    answers = dict(zip(ids, await asyncio.gather(*(confirm(http, id) for id in ids)), strict=True))

    assert await shared.since() == (1, 4)
    for id in good:
        assert (answers[id].status_code, answers[id].json()["status"]) == (200, "sent")
    guilty = answers["gc-guilty"]
    assert guilty.status_code == 500, guilty.text
    assert code(guilty) == "internal", guilty.text
    assert await statuses(sdk_db, ids) == {**dict.fromkeys(good, "sent"), "gc-guilty": "pending"}
    assert await deliveries(sdk_db, ids) == {
        **{id: ["credit", "inventory", "wms"] for id in good},
        "gc-guilty": [],
    }
    # The shared run published all four before its COMMIT failed; the reruns published
    # the three again, and the guilty one's own run once more before it failed again.
    copies = await queued(amqp, settings.queue_name("inventory"))
    assert sorted(set(copies)) == sorted(ids)
    assert all(copies.count(id) == 2 for id in ids), copies

    # Once the constraint is gone, check-back settles it: the producer committed.
    await drop_trigger(sdk_db)
    producer, _ = endpoint
    producer.answers["gc-guilty"] = "committed"

    async def sent() -> bool:
        await runtime.checkback.run_once()
        return (await statuses(sdk_db, ["gc-guilty"]))["gc-guilty"] == "sent"

    await wait_until(sent, within=15, every=0.2)
    assert await deliveries(sdk_db, ["gc-guilty"]) == {"gc-guilty": ["credit", "inventory", "wms"]}


# -- 3. SIGKILL of the service with a window open -----------------------------------------


@asynccontextmanager
async def api_only(config: Path, log: Path) -> AsyncIterator[Instance]:
    """``reliable-msg serve --no-scanners``, stopped whatever happens."""
    port = free_port()
    argv = serve_argv(config, "--no-scanners", "--port", str(port))
    instance = Instance(log.stem, argv, {**os.environ, "RMSG_LOG_LEVEL": "info"}, log, port=port)
    instance.start()
    try:
        await wait_ready(instance.url, instance, within=STARTUP)
        yield instance
    finally:
        await asyncio.to_thread(stop, [instance], GRACE)


async def test_a_service_killed_with_calls_waiting_in_its_window_loses_nothing(
    make_settings: Callable[..., Settings],
    sdk_db: asyncpg.Connection,
    pool: asyncpg.Pool,
    database_url: str,
    tmp_path: Path,
) -> None:
    """One prepare and one confirm hold the only running slot of their kind (each waits
    on a lock the test holds), so the calls sent after them wait in open batches when
    the service is SIGKILLed. The producer had committed c-* locally (its markers) and
    not r-* (it died first); q-* were prepares never answered, so never committed.
    Restarted, the service asks the producer's check-back endpoint (the SDK's, over its
    markers): every committed message is delivered and handled once, the rest cancelled."""
    check_port = free_port()
    settings = make_settings(
        producers={
            "order": {
                "check_url": f"http://127.0.0.1:{check_port}/rmsg/check-back",
                "token": PRODUCER,
            }
        },
        group_commit={"window": WINDOW, "max_running": 1},
        checkback={"after": 0.2, "timeout": 2.0, "lease": 3.0},
    )
    config = write_config(settings, tmp_path / "config.toml")
    committed = ["c-block", *(f"c-{n}" for n in range(4))]
    rolled_back = ["r-0", "r-1"]
    unanswered = ["q-block", "q-0", "q-1"]
    # order.created: only the credit group takes it (order.*).
    created = [body(id, "order.created") for id in [*committed, *rolled_back]]
    producer_app = FastAPI()
    producer_app.include_router(check_back_router(pool, PRODUCER))
    try:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(serving_app(producer_app, port=check_port))
            # It runs no scanner: what it had in hand when killed is the restarted one's.
            first = await stack.enter_async_context(api_only(config, tmp_path / "killed.log"))
            async with httpx.AsyncClient(base_url=first.url, timeout=30.0) as http:
                await prepare(http, *created)
                await sdk_db.execute(
                    f"INSERT INTO {MARKER_TABLE} (message_id, state)"
                    " SELECT unnest($1::text[]), 'committed'",
                    committed,
                )
                held = await asyncpg.connect(database_url)
                stack.push_async_callback(held.close)
                await held.execute(
                    """
                    BEGIN;
                    SELECT 1 FROM rmsg_message WHERE id = 'c-block' FOR UPDATE;
                    INSERT INTO rmsg_used_id (id, producer) VALUES ('q-block', 'order');
                    """
                )
                blockers = [
                    asyncio.create_task(confirm(http, "c-block")),
                    asyncio.create_task(
                        http.post(
                            "/v1/messages",
                            json=body("q-block", "order.created"),
                            headers=auth(PRODUCER),
                        )
                    ),
                ]
                await wait_until(
                    lambda: _waiting(sdk_db, 2), within=15
                )  # both slots taken, on the test's locks
                waiting = [asyncio.create_task(confirm(http, id)) for id in committed[1:]]
                waiting += [
                    asyncio.create_task(
                        http.post(
                            "/v1/batch/prepare",
                            json={"messages": [body(id, "order.created") for id in unanswered[1:]]},
                            headers=auth(PRODUCER),
                        )
                    )
                ]
                # The calls are on their way into the open batches; nothing can run them.
                await asyncio.sleep(WINDOW / 2)
                os.kill(first.pid, signal.SIGKILL)
                outcomes = await asyncio.gather(*blockers, *waiting, return_exceptions=True)
                await held.execute("ROLLBACK")
            # None was answered: the service died with every one of them in hand.
            for outcome in outcomes:
                assert isinstance(outcome, httpx.TransportError), outcome
                assert not isinstance(outcome, httpx.ConnectError), outcome
            # The calls in the window never ran. The blocked prepare of q-block was in
            # PostgreSQL's hands: its statement may have finished once the test's lock
            # went, answer lost; then it is a prepare never committed, like r-*.
            after_kill = await statuses(sdk_db, [*committed, *rolled_back, *unanswered])
            assert after_kill.pop("q-block", "pending") == "pending"
            assert after_kill == dict.fromkeys([*committed, *rolled_back], "pending")
            never = [*rolled_back, *(["q-block"] if await statuses(sdk_db, ["q-block"]) else [])]

            restarted = await stack.enter_async_context(
                running_async(config, tmp_path, name="restarted")
            )
            consumer = effects_consumer(restarted.url, settings, pool, "credit", "order.created")
            task = asyncio.create_task(consumer.run(handle_signals=False))
            try:

                async def finished() -> bool:
                    now = await statuses(sdk_db, [*committed, *never])
                    return now == {
                        **dict.fromkeys(committed, "done"),
                        **dict.fromkeys(never, "cancelled"),
                    }

                await wait_until(finished, within=60, every=0.3)
            finally:
                consumer.request_stop()
                await asyncio.wait_for(task, 30)
        assert await handled(sdk_db) == sorted(committed)
        assert await deliveries(sdk_db, [*committed, *never]) == {
            **{id: ["credit"] for id in committed},
            **{id: [] for id in never},
        }
        # The prepares that waited in the window were never written.
        assert await statuses(sdk_db, ["q-0", "q-1"]) == {}
    finally:
        await remove_traces(settings)


# -- 4. batch forms and unhappy paths, with group commit on and off -----------------------

ON_AND_OFF = pytest.mark.parametrize("enabled", [True, False], ids=["on", "off"])


def results(r: httpx.Response) -> list[tuple[str, str | None]]:
    """A batch answer as (id, status or error code) per item."""
    assert r.status_code == 200, r.text
    return [(i["id"], i["status"] if i["ok"] else i["error"]["code"]) for i in r.json()["results"]]


@ON_AND_OFF
async def test_batch_and_single_calls_share_a_window_and_bad_ones_fail_alone(
    http: httpx.AsyncClient,
    settings: Settings,
    db: asyncpg.Connection,
    amqp: aio_pika.abc.AbstractConnection,
    enabled: bool,
) -> None:
    producer = auth(PRODUCER)
    prepares, confirms, acks = [await runs(http, op) for op in ("prepare", "confirm", "ack")]
    batch, s0, s1, nul, broken = await asyncio.gather(
        http.post(
            "/v1/batch/prepare",
            json={"messages": [body("b-0"), body("b-1"), body("x-0", "nobody.listens")]},
            headers=producer,
        ),
        http.post("/v1/messages", json=body("s-0"), headers=producer),
        http.post("/v1/messages", json=body("s-1"), headers=producer),
        http.post(
            "/v1/messages",
            json={"id": "nul", "topic": "order.paid", "payload": {"a": "\x00"}},
            headers=producer,
        ),
        http.post(
            "/v1/messages",
            content=b'{"id": "broken", "topic":',
            headers={**producer, "Content-Type": "application/json"},
        ),
    )
    assert results(batch) == [("b-0", "pending"), ("b-1", "pending"), ("x-0", "no_subscriber")]
    assert (s0.status_code, s1.status_code) == (201, 201), (s0.text, s1.text)
    assert (nul.status_code, code(nul)) == (422, "invalid_request"), nul.text
    assert (broken.status_code, code(broken)) == (400, "invalid_json"), broken.text
    # The bad bodies were refused before the window; the rest shared one run.
    assert await prepares.since() == ((1, 5) if enabled else (0, 0))

    batch, b1, s1, nope, theirs = await asyncio.gather(
        http.post("/v1/batch/confirm", json={"ids": ["b-0", "s-0", "unknown"]}, headers=producer),
        confirm(http, "b-1"),
        confirm(http, "s-1"),
        confirm(http, "nope"),
        confirm(http, "s-0", OTHER_PRODUCER),
    )
    assert results(batch) == [("b-0", "sent"), ("s-0", "sent"), ("unknown", "not_found")]
    assert [r.json()["status"] for r in (b1, s1)] == ["sent", "sent"], (b1.text, s1.text)
    assert (nope.status_code, code(nope)) == (404, "not_found"), nope.text
    assert theirs.status_code == 403, theirs.text
    # The owner's calls shared one run; the other producer's ran on its own.
    assert await confirms.since() == ((2, 7) if enabled else (0, 0))
    ids = ["b-0", "b-1", "s-0", "s-1"]
    assert sorted(await queued(amqp, settings.queue_name("inventory"))) == ids

    inventory, credit = auth(GROUP_TOKENS["inventory"]), auth(GROUP_TOKENS["credit"])
    answers = await asyncio.gather(
        http.post("/v1/batch/ack", json={"ids": ["b-0", "b-1"]}, headers=inventory),
        http.post("/v1/messages/s-0/ack", headers=inventory),
        http.post("/v1/messages/s-1/ack", headers=inventory),
        http.post("/v1/messages/x-0/ack", headers=inventory),
        http.post("/v1/batch/ack", json={"ids": ["b-0", "s-0"]}, headers=credit),
        http.post("/v1/messages/b-1/ack", headers=credit),
    )
    inv_batch, inv_s0, inv_s1, unknown, credit_batch, credit_b1 = answers
    assert results(inv_batch) == [("b-0", "done"), ("b-1", "done")]
    assert results(credit_batch) == [("b-0", "done"), ("s-0", "done")]
    for r in (inv_s0, inv_s1, credit_b1):
        assert (r.status_code, r.json()["status"]) == (200, "done"), r.text
    assert (unknown.status_code, code(unknown)) == (404, "not_found"), unknown.text
    # Each group's acks shared a run of their own.
    assert await acks.since() == ((2, 8) if enabled else (0, 0))
    rows = await db.fetch(
        "SELECT message_id, group_name FROM rmsg_delivery WHERE status = 'done'"
        " ORDER BY message_id, group_name"
    )
    assert [(r["message_id"], r["group_name"]) for r in rows] == [
        ("b-0", "credit"),
        ("b-0", "inventory"),
        ("b-1", "credit"),
        ("b-1", "inventory"),
        ("s-0", "credit"),
        ("s-0", "inventory"),
        ("s-1", "inventory"),
    ]


@ON_AND_OFF
async def test_two_prepares_of_one_id_in_one_window_never_both_create_it(
    http: httpx.AsyncClient, db: asyncpg.Connection, enabled: bool
) -> None:
    prepares = await runs(http, "prepare")
    producer = auth(PRODUCER)
    one, two = await asyncio.gather(
        http.post("/v1/messages", json=body("twin", n=1), headers=producer),
        http.post("/v1/messages", json=body("twin", n=2), headers=producer),
    )
    assert sorted([one.status_code, two.status_code]) == [201, 409], (one.text, two.text)
    created, refused = (one, two) if one.status_code == 201 else (two, one)
    assert code(refused) == "id_conflict", refused.text
    stored = await db.fetchval("SELECT payload::text FROM rmsg_message WHERE id = 'twin'")
    assert stored == '{"n": ' + str(created.json()["payload"]["n"]) + "}"
    # The same request twice: one creates it, the other is answered the repeat.
    first, again = await asyncio.gather(
        http.post("/v1/messages", json=body("same"), headers=producer),
        http.post("/v1/batch/prepare", json={"messages": [body("same")]}, headers=producer),
    )
    assert first.status_code in (200, 201), first.text
    [item] = again.json()["results"]
    assert (item["ok"], item["status"]) == (True, "pending"), again.text
    assert [first.status_code == 201, item["created"]].count(True) == 1
    # Two calls of one id never share a run: each saw the other's outcome.
    assert await prepares.since() == ((4, 4) if enabled else (0, 0))


@ON_AND_OFF
async def test_one_id_confirmed_by_concurrent_calls_is_sent_and_published_once(
    http: httpx.AsyncClient,
    settings: Settings,
    db: asyncpg.Connection,
    amqp: aio_pika.abc.AbstractConnection,
    enabled: bool,
) -> None:
    await prepare(http, body("dup"))
    confirms = await runs(http, "confirm")
    one, two, batch = await asyncio.gather(
        confirm(http, "dup"),
        confirm(http, "dup"),
        http.post("/v1/batch/confirm", json={"ids": ["dup"]}, headers=auth(PRODUCER)),
    )
    assert [r.json()["status"] for r in (one, two)] == ["sent", "sent"], (one.text, two.text)
    assert results(batch) == [("dup", "sent")]
    assert await confirms.since() == ((1, 3) if enabled else (0, 0))
    assert await deliveries(db, ["dup"]) == {"dup": ["credit", "inventory", "wms"]}
    assert await queued(amqp, settings.queue_name("inventory")) == ["dup"]


@ON_AND_OFF
async def test_one_id_acked_by_concurrent_calls_is_answered_as_a_repeat_once(
    http: httpx.AsyncClient, db: asyncpg.Connection, enabled: bool
) -> None:
    """Two acks of one delivery: one moves it, the other is a repeat and says since when
    (``done_at``), whether the two shared a run or not."""
    await prepare(http, body("twice"))
    assert (await confirm(http, "twice")).status_code == 200
    acks = await runs(http, "ack")
    inventory = auth(GROUP_TOKENS["inventory"])
    answers = await asyncio.gather(
        http.post("/v1/batch/ack", json={"ids": ["twice"]}, headers=inventory),
        http.post("/v1/batch/ack", json={"ids": ["twice"]}, headers=inventory),
    )
    assert [results(r) for r in answers] == [[("twice", "done")]] * 2
    done_at = await db.fetchval(
        "SELECT done_at FROM rmsg_delivery WHERE message_id = 'twice' AND group_name = 'inventory'"
    )
    said = sorted(str(r.json()["results"][0].get("done_at")) for r in answers)
    assert said == sorted(["None", done_at.isoformat()]), said
    assert await acks.since() == ((1, 2) if enabled else (0, 0))
