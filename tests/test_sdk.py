"""The producer and consumer SDKs end to end, over real HTTP, PostgreSQL and RabbitMQ."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aio_pika
import asyncpg
import pytest
from fastapi import FastAPI

from reliable_msg.errors import Conflict, Fenced, Unprocessable
from reliable_msg.harness.ports import free_port
from reliable_msg.harness.process import stop_gracefully
from reliable_msg.sdk import consumer as consumer_sdk
from reliable_msg.sdk import producer as producer_sdk
from reliable_msg.sdk.client import RetryPolicy
from reliable_msg.sdk.consumer import Consumer, Received
from reliable_msg.sdk.producer import Outgoing, Producer, check_back_router
from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from tests.conftest import AMQP_URL, PRODUCER
from tests.helpers.consumers import inventory_consumer, inventory_process_env
from tests.helpers.servers import serving_app
from tests.helpers.waiting import wait_until

FAST = RetryPolicy(attempts=3, initial=0.05, max_wait=0.2, deadline=2.0)


@pytest.fixture
def check_port() -> int:
    return free_port()


@pytest.fixture
def settings(make_settings: Callable[..., Settings], check_port: int) -> Settings:
    url = f"http://127.0.0.1:{check_port}/rmsg/check-back"
    return make_settings(producers={"order": {"check_url": url, "token": PRODUCER}})


@pytest.fixture
async def producer(service_url: str) -> AsyncIterator[Producer]:
    async with Producer(service_url, PRODUCER, retry=FAST) as p:
        yield p


@asynccontextmanager
async def consuming(
    consumer: Consumer,
) -> AsyncIterator[Consumer]:
    task = asyncio.create_task(consumer.run(handle_signals=False))
    try:
        yield consumer
    finally:
        consumer.request_stop()
        await asyncio.wait_for(task, 10)


async def record_effect(conn: asyncpg.Connection, message: Received) -> None:
    await conn.execute(
        "INSERT INTO sdk_effects (group_name, message_id) VALUES ('inventory', $1)", message.id
    )


async def effects(db: asyncpg.Connection, id: str) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM sdk_effects WHERE message_id = $1", id)
    return count


async def delivery(db: asyncpg.Connection, id: str, group: str = "inventory") -> str | None:
    status: str | None = await db.fetchval(
        "SELECT status FROM rmsg_delivery WHERE message_id = $1 AND group_name = $2", id, group
    )
    return status


async def test_committed_transaction_is_delivered_and_handled_once(
    producer: Producer,
    service_url: str,
    settings: Settings,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
) -> None:
    async with pool.acquire() as conn:
        async with producer.transaction(conn, "order.paid", {"order": 1}) as sent:
            await conn.execute("INSERT INTO sdk_orders (id) VALUES ('o-1')")
    assert sent.confirmed
    [id] = sent.ids
    marker = await sdk_db.fetchval("SELECT state FROM rmsg_producer_marker")
    assert marker == "committed"

    consumer = inventory_consumer(service_url, settings, pool, FAST, Consumer)
    consumer.add_handler("order.paid", record_effect)
    async with consuming(consumer):
        await wait_until(lambda: _done(sdk_db, id), within=10)
    assert await effects(sdk_db, id) == 1


async def _done(db: asyncpg.Connection, id: str) -> bool:
    return await delivery(db, id) == "done"


async def test_raising_transaction_cancels_the_message(
    producer: Producer, pool: asyncpg.Pool, sdk_db: asyncpg.Connection
) -> None:
    with pytest.raises(RuntimeError, match="payment declined"):
        async with pool.acquire() as conn:
            async with producer.transaction(conn, "order.paid", {"order": 2}, id="o-2"):
                await conn.execute("INSERT INTO sdk_orders (id) VALUES ('o-2')")
                raise RuntimeError("payment declined")
    assert await sdk_db.fetchval("SELECT status FROM rmsg_message WHERE id = 'o-2'") == (
        "cancelled"
    )
    assert await sdk_db.fetchval("SELECT count(*) FROM sdk_orders") == 0
    assert await sdk_db.fetchval("SELECT count(*) FROM rmsg_producer_marker") == 0


async def test_prepare_error_is_typed_and_nothing_runs(
    producer: Producer, pool: asyncpg.Pool, sdk_db: asyncpg.Connection
) -> None:
    ran = False
    with pytest.raises(Unprocessable, match="no consumer group"):
        async with pool.acquire() as conn:
            async with producer.transaction(conn, "nobody.listens", {}):
                ran = True
    assert not ran


async def test_producer_killed_between_commit_and_confirm_is_delivered_by_check_back(
    runtime: Runtime,
    service_url: str,
    settings: Settings,
    check_port: int,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
    database_url: str,
) -> None:
    env = {**os.environ, "DB": database_url, "SERVICE": service_url, "TOKEN": PRODUCER}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.helpers.sdk_process", "produce-and-die", "o-3", env=env
    )
    assert await proc.wait() == -signal.SIGKILL
    assert await sdk_db.fetchval("SELECT count(*) FROM sdk_orders WHERE id = 'o-3'") == 1
    assert await sdk_db.fetchval("SELECT status FROM rmsg_message WHERE id = 'o-3'") == "pending"

    app = FastAPI()
    app.include_router(check_back_router(pool, PRODUCER))
    async with serving_app(app, port=check_port):
        await asyncio.sleep(settings.checkback.after)

        async def sent() -> bool:
            await runtime.checkback.run_once()
            status = await sdk_db.fetchval("SELECT status FROM rmsg_message WHERE id = 'o-3'")
            return bool(status == "sent")

        await wait_until(sent, within=10)

    consumer = inventory_consumer(service_url, settings, pool, FAST, Consumer)
    consumer.add_handler("order.paid", record_effect)
    async with consuming(consumer):
        await wait_until(lambda: _done(sdk_db, "o-3"), within=10)
    assert await effects(sdk_db, "o-3") == 1


async def test_check_back_fences_a_transaction_that_never_committed(
    producer: Producer, pool: asyncpg.Pool, sdk_db: asyncpg.Connection
) -> None:
    assert await producer_sdk.check_back(pool, "never") == "rolled_back"
    # The producer's transaction arriving late cannot commit any more.
    ran = False
    with pytest.raises(Fenced):
        async with pool.acquire() as conn:
            async with producer.transaction(conn, "order.paid", {}, id="never"):
                ran = True
    assert not ran
    assert await producer_sdk.check_back(pool, "never") == "rolled_back"
    assert await sdk_db.fetchval("SELECT status FROM rmsg_message WHERE id = 'never'") == (
        "cancelled"
    )


async def test_a_second_transaction_with_the_same_id_never_cancels_the_first(
    producer: Producer, pool: asyncpg.Pool, sdk_db: asyncpg.Connection
) -> None:
    first_in = asyncio.Event()
    release = asyncio.Event()

    async def first() -> None:
        async with pool.acquire() as conn:
            async with producer.transaction(conn, "order.paid", {"n": 1}, id="twice") as sent:
                await conn.execute("INSERT INTO sdk_orders (id) VALUES ('first')")
                first_in.set()
                await release.wait()
        assert sent.confirmed

    async def second() -> None:
        await first_in.wait()
        async with pool.acquire() as conn:
            async with producer.transaction(conn, "order.paid", {"n": 1}, id="twice"):
                await conn.execute("INSERT INTO sdk_orders (id) VALUES ('second')")

    one = asyncio.create_task(first())
    two = asyncio.create_task(second())
    await first_in.wait()
    await asyncio.sleep(0.3)  # the second transaction now waits on the first one's marker
    release.set()
    await one
    with pytest.raises(Conflict) as raised:
        await two
    assert raised.value.code == "duplicate_transaction"
    assert await sdk_db.fetchval("SELECT status FROM rmsg_message WHERE id = 'twice'") == "sent"
    orders = await sdk_db.fetch("SELECT id FROM sdk_orders")
    assert [r["id"] for r in orders] == ["first"]


async def test_a_retry_after_a_rollback_cannot_reuse_the_cancelled_id(
    producer: Producer, pool: asyncpg.Pool, sdk_db: asyncpg.Connection
) -> None:
    """The first attempt's block fails: rollback, message cancelled. A retry with the same
    id is refused before its block runs, so no business row commits without a message."""
    with pytest.raises(RuntimeError, match="database went away"):
        async with pool.acquire() as conn:
            async with producer.transaction(conn, "order.paid", {"n": 1}, id="retried"):
                await conn.execute("INSERT INTO sdk_orders (id) VALUES ('attempt-1')")
                raise RuntimeError("database went away")
    assert await sdk_db.fetchval("SELECT status FROM rmsg_message WHERE id = 'retried'") == (
        "cancelled"
    )
    ran = False
    with pytest.raises(Conflict) as raised:
        async with pool.acquire() as conn:
            async with producer.transaction(conn, "order.paid", {"n": 1}, id="retried"):
                ran = True
                await conn.execute("INSERT INTO sdk_orders (id) VALUES ('attempt-2')")
    assert raised.value.code == "message_cancelled"
    assert not ran
    assert await sdk_db.fetchval("SELECT count(*) FROM sdk_orders") == 0
    assert (
        await sdk_db.fetchval(
            "SELECT count(*) FROM rmsg_producer_marker WHERE message_id = 'retried'"
        )
        == 0
    )


async def test_a_retry_after_a_commit_is_refused_before_its_block(
    producer: Producer, pool: asyncpg.Pool, sdk_db: asyncpg.Connection
) -> None:
    async with pool.acquire() as conn:
        async with producer.transaction(conn, "order.paid", {"n": 1}, id="once") as sent:
            await conn.execute("INSERT INTO sdk_orders (id) VALUES ('once')")
    assert sent.confirmed
    ran = False
    with pytest.raises(Conflict) as raised:
        async with pool.acquire() as conn:
            async with producer.transaction(conn, "order.paid", {"n": 1}, id="once"):
                ran = True
    assert raised.value.code == "duplicate_transaction"
    assert not ran
    assert await sdk_db.fetchval("SELECT status FROM rmsg_message WHERE id = 'once'") == "sent"


async def test_a_connection_already_in_a_transaction_is_refused(
    producer: Producer, pool: asyncpg.Pool, sdk_db: asyncpg.Connection
) -> None:
    async with pool.acquire() as conn, conn.transaction():
        with pytest.raises(RuntimeError, match="outside a transaction"):
            async with producer.transaction(conn, "order.paid", {}):
                pass
    assert await sdk_db.fetchval("SELECT count(*) FROM rmsg_message") == 0


async def test_check_back_waits_for_an_open_transaction(
    pool: asyncpg.Pool, sdk_db: asyncpg.Connection
) -> None:
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await producer_sdk._write_markers(conn, ["open"])
        # While the transaction is open the answer is unknown, never rolled back.
        assert await producer_sdk.check_back(pool, "open", lock_timeout=0.2) == "unknown"
        answer = asyncio.create_task(producer_sdk.check_back(pool, "open", lock_timeout=5))
        await asyncio.sleep(0.2)
        await tx.commit()
    assert await answer == "committed"


async def test_consumer_killed_after_effect_before_ack_applies_once(
    runtime: Runtime,
    service_url: str,
    settings: Settings,
    producer: Producer,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
    database_url: str,
) -> None:
    async with pool.acquire() as conn:
        async with producer.transaction(conn, "order.paid", {"order": 4}, id="o-4"):
            pass
    env = inventory_process_env(service_url, settings, database_url)
    crashing = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.helpers.sdk_process", "consume", "inventory", "o-4", env=env
    )
    try:
        assert await asyncio.wait_for(crashing.wait(), 20) == -signal.SIGKILL
    finally:
        if crashing.returncode is None:
            crashing.kill()
    assert await effects(sdk_db, "o-4") == 1
    assert await delivery(sdk_db, "o-4") == "sent"  # the ack never left

    restarted = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.helpers.sdk_process", "consume", "inventory", env=env
    )
    try:
        await wait_until(lambda: _done(sdk_db, "o-4"), within=20)
    finally:
        assert await stop_gracefully(restarted, grace=20.0) == [0], "no clean exit on SIGTERM"
    assert await effects(sdk_db, "o-4") == 1


async def test_sigterm_lets_the_handler_in_progress_finish_and_ack(
    runtime: Runtime,
    service_url: str,
    settings: Settings,
    producer: Producer,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
    database_url: str,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    hold = 4242  # the advisory lock the consumer's handler waits for
    env = inventory_process_env(service_url, settings, database_url, HOLD=str(hold))

    async def handler_waiting() -> bool:
        waiting = await sdk_db.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1"
            " AND NOT granted",
            hold,
        )
        return bool(waiting == 1)

    async with pool.acquire() as holder:
        await holder.execute("SELECT pg_advisory_lock($1)", hold)
        consumer = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.helpers.sdk_process", "consume", "inventory", env=env
        )
        try:
            async with producer.transaction(sdk_db, "order.paid", {"order": 6}, id="o-6"):
                pass
            await wait_until(handler_waiting, within=20)
            consumer.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            assert consumer.returncode is None, "stopped without waiting for its handler"
            await holder.execute("SELECT pg_advisory_unlock($1)", hold)
            assert await asyncio.wait_for(consumer.wait(), 20) == 0
        finally:
            if consumer.returncode is None:
                consumer.kill()
                await consumer.wait()
    assert await effects(sdk_db, "o-6") == 1
    assert await delivery(sdk_db, "o-6") == "done"
    attempts = await sdk_db.fetchval(
        "SELECT attempts FROM rmsg_delivery WHERE message_id = 'o-6' AND group_name = 'inventory'"
    )
    assert attempts == 1
    # Acked to RabbitMQ too: nothing went back to the queue when the consumer left.
    channel = await amqp.channel()
    queue = await channel.declare_queue(settings.queue_name("inventory"), passive=True)
    assert queue.declaration_result.message_count == 0
    assert unacked(settings.queue_name("inventory")) == 0
    await channel.close()


async def test_handler_failing_three_times_then_succeeding_has_one_effect(
    runtime: Runtime,
    service_url: str,
    settings: Settings,
    producer: Producer,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger=consumer_sdk.log.name)
    calls = 0

    async def flaky(conn: asyncpg.Connection, message: Received) -> None:
        nonlocal calls
        calls += 1
        await record_effect(conn, message)  # rolled back when we raise below
        if calls <= 3:
            raise RuntimeError(f"flaky failure {calls}")

    consumer = inventory_consumer(service_url, settings, pool, FAST, Consumer)
    consumer.add_handler("order.paid", flaky)
    async with pool.acquire() as conn:
        async with producer.transaction(conn, "order.paid", {"order": 5}, id="o-5"):
            pass
    async with consuming(consumer):

        async def done() -> bool:
            await runtime.redelivery.run_once()
            return await _done(sdk_db, "o-5")

        await wait_until(done, within=30, every=0.1)
    assert calls == 4
    assert await effects(sdk_db, "o-5") == 1
    attempts = await sdk_db.fetchval(
        "SELECT attempts FROM rmsg_delivery WHERE message_id = 'o-5' AND group_name = 'inventory'"
    )
    assert attempts == 4
    failures = [
        r for r in caplog.records if r.name == consumer_sdk.log.name and r.levelno == logging.ERROR
    ]
    assert [getattr(r, "message_id", None) for r in failures] == ["o-5"] * 3
    for record in failures:
        assert "o-5" in record.getMessage()
        assert record.exc_info is not None and "flaky failure" in str(record.exc_info[1])


async def test_batch_produce_and_batched_acks(
    service_url: str,
    settings: Settings,
    producer: Producer,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
) -> None:
    messages = [Outgoing("order.paid", {"order": i}, key=f"m{i % 7}") for i in range(60)]
    async with pool.acquire() as conn:
        async with producer.transaction_many(conn, messages) as sent:
            await conn.execute(
                "INSERT INTO sdk_orders (id) SELECT unnest($1::text[])", [m.id for m in messages]
            )
    assert sent.confirmed and len(sent.ids) == 60
    assert await sdk_db.fetchval("SELECT count(*) FROM rmsg_producer_marker") == 60

    consumer = inventory_consumer(service_url, settings, pool, FAST, Consumer, ack_interval=0.2)
    consumer.add_handler("order.paid", record_effect)
    async with consuming(consumer):

        async def all_done() -> bool:
            n = await sdk_db.fetchval(
                "SELECT count(*) FROM rmsg_delivery WHERE group_name = 'inventory'"
                " AND status = 'done'"
            )
            return bool(n == 60)

        await wait_until(all_done, within=20)
    assert await sdk_db.fetchval("SELECT count(DISTINCT message_id) FROM sdk_effects") == 60
    assert await sdk_db.fetchval("SELECT count(*) FROM sdk_effects") == 60
    assert 1 <= consumer.acks.batches < 60, "acks were not batched"


async def test_messages_handled_together_share_a_transaction_and_fail_alone(
    pool: asyncpg.Pool, sdk_db: asyncpg.Connection
) -> None:
    """Messages handled at the same moment commit together; when one handler fails, the
    others are handled again, each in a transaction of its own, and keep one effect."""
    transactions: dict[str, int] = {}

    async def effect(conn: asyncpg.Connection, message: Received) -> None:
        transactions[message.id] = await conn.fetchval("SELECT txid_current()")
        await record_effect(conn, message)
        if message.payload == "bad":
            raise RuntimeError("this handler always fails")

    consumer = Consumer(
        "inventory", service_url="http://127.0.0.1:9", token="-", amqp_url=AMQP_URL, pool=pool
    )
    consumer.add_handler("order.paid", effect)

    def received(id: str, payload: str = "ok") -> Received:
        return Received(id=id, topic="order.paid", payload=payload)

    first = [received(f"t-{i}") for i in range(10)]
    assert await asyncio.gather(*(consumer.handle(r) for r in first)) == [True] * 10
    assert len({transactions[r.id] for r in first}) == 1, "not one shared transaction"

    second = [received(f"u-{i}") for i in range(5)] + [received("bad", "bad"), first[0]]
    outcomes = await asyncio.gather(*(consumer.handle(r) for r in second), return_exceptions=True)
    assert outcomes[:5] == [True] * 5
    assert isinstance(outcomes[5], RuntimeError)
    assert outcomes[6] is False, "a message already handled was handled again"
    assert len({transactions[r.id] for r in second[:5]}) == 5, "no fallback one by one"

    twice = await asyncio.gather(*(consumer.handle(received("v-1")) for _ in range(2)))
    assert sorted(twice) == [False, True]

    assert await effects(sdk_db, "bad") == 0
    assert await sdk_db.fetchval("SELECT count(*) FROM sdk_effects") == 16
    assert await sdk_db.fetchval("SELECT count(DISTINCT message_id) FROM sdk_effects") == 16
    inbox = await sdk_db.fetchval("SELECT count(*) FROM rmsg_inbox WHERE group_name = 'inventory'")
    assert inbox == 16


def unacked(queue: str) -> int:
    """The deliveries of ``queue`` that RabbitMQ has handed out and not had acked."""
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name", "messages_unacknowledged"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for line in listed.stdout.splitlines():
        name, _, count = line.partition("\t")
        if name == queue:
            return int(count)
    raise AssertionError(f"RabbitMQ lists no queue {queue}")


async def open_transactions(conn: asyncpg.Connection, application: str) -> int:
    """Transactions open now on the connections named ``application``."""
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    count: int = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE application_name = $1 AND xact_start IS NOT NULL",
        application,
    )
    return count


async def test_a_blocked_consumer_holds_at_most_prefetch_messages_and_concurrency_transactions(
    service_url: str,
    settings: Settings,
    producer: Producer,
    database_url: str,
    sdk_db: asyncpg.Connection,
) -> None:
    prefetch, concurrency, total = 5, 2, 30
    queue = settings.queue_name("inventory")
    application = f"rmsg-bounds-{uuid.uuid4().hex[:8]}"
    release = asyncio.Event()
    entered: list[str] = []
    inside = most_inside = most_open = 0

    async def blocking(conn: asyncpg.Connection, message: Received) -> None:
        nonlocal inside, most_inside, most_open
        entered.append(message.id)
        inside += 1
        most_inside = max(most_inside, inside)
        most_open = max(most_open, await open_transactions(conn, application))
        try:
            await release.wait()
            await record_effect(conn, message)
        finally:
            inside -= 1

    messages = [Outgoing("order.paid", {"order": i}) for i in range(total)]
    async with (
        asyncpg.create_pool(
            database_url,
            min_size=1,
            max_size=10,
            server_settings={"application_name": application},
        ) as pool,
        pool.acquire() as conn,
    ):
        async with producer.transaction_many(conn, messages) as sent:
            pass
        assert sent.confirmed
        consumer = inventory_consumer(
            service_url,
            settings,
            pool,
            FAST,
            Consumer,
            prefetch=prefetch,
            concurrency=concurrency,
            handle_batch=1,  # a transaction a message: each waiting one wants a transaction
        )
        consumer.add_handler("order.paid", blocking)
        async with consuming(consumer):
            try:
                await wait_until(
                    lambda: len(entered) >= concurrency and unacked(queue) >= prefetch, within=20
                )
                await asyncio.sleep(0.5)  # room for anything beyond the bounds to show
                assert unacked(queue) == prefetch
                assert len(entered) == concurrency
                assert await open_transactions(sdk_db, application) == concurrency
            finally:
                release.set()

            async def all_done() -> bool:
                done = await sdk_db.fetchval(
                    "SELECT count(*) FROM rmsg_delivery"
                    " WHERE group_name = 'inventory' AND status = 'done'"
                )
                return bool(done == total)

            await wait_until(all_done, within=30)
            await wait_until(lambda: unacked(queue) == 0, within=10)
    assert most_inside <= concurrency
    assert most_open <= concurrency
    assert sorted(entered) == sorted(m.id for m in messages), "a message handled twice"
    assert await sdk_db.fetchval("SELECT count(*) FROM sdk_effects") == total
    assert await sdk_db.fetchval("SELECT count(DISTINCT message_id) FROM sdk_effects") == total
