"""Several ``serve`` processes over one database: each due row is handled once a pass."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aio_pika
import asyncpg

from reliable_msg.service.settings import Settings
from tests.helpers import rabbit
from tests.helpers.service import Instance, running, write_config
from tests.helpers.waiting import wait_until

DUE_ROWS = 1000
#: Rows one instance is given alone while the other is paused, each way round.
ALONE = 10


@contextmanager
def paused(instance: Instance) -> Iterator[None]:
    """``instance`` stopped (SIGSTOP) for the block: its scheduler runs no pass."""
    os.kill(instance.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(instance.pid, signal.SIGCONT)


async def test_two_instances_redeliver_each_due_row_once(
    settings: Settings,
    db: asyncpg.Connection,
    amqp: aio_pika.abc.AbstractConnection,
    tmp_path: Path,
) -> None:
    config = write_config(
        settings,
        tmp_path / "config.toml",
        # One redelivery each: after it, the next one is an hour away.
        redelivery={"ack_timeout": 3600.0, "backoff_cap": 3600.0, "jitter": 0.0},
        scanner={"interval": 0.05, "batch": 50},
    )
    ids = [f"due-{i}" for i in range(1, DUE_ROWS + 1)]
    first, second, rest = ids[:ALONE], ids[ALONE : 2 * ALONE], ids[2 * ALONE :]

    async def make_due(wave: list[str]) -> None:
        await db.execute(
            "UPDATE rmsg_delivery SET next_attempt_at = now() - interval '1 second'"
            " WHERE message_id = ANY($1::text[])",
            wave,
        )

    async def redelivered(wave: list[str]) -> None:
        async def done() -> bool:
            n = await db.fetchval(
                "SELECT count(*) FROM rmsg_delivery WHERE attempts = 2"
                " AND message_id = ANY($1::text[])",
                wave,
            )
            return bool(n == len(wave))

        await wait_until(done, within=60, every=0.1)

    try:
        with running(config, tmp_path, count=2) as [a, b]:
            # Unacked deliveries, none due yet.
            await db.execute(
                """
                INSERT INTO rmsg_message (id, topic, producer, payload, status, groups,
                                          remaining, sent_at)
                SELECT id, 'order.paid', 'order', '{}', 'sent', '{inventory}', 1, now()
                FROM unnest($1::text[]) AS id
                """,
                ids,
            )
            await db.execute(
                """
                INSERT INTO rmsg_delivery (message_id, group_name, status, attempts,
                                           next_attempt_at)
                SELECT id, 'inventory', 'sent', 1, now() + interval '1 hour'
                FROM rmsg_message
                """
            )
            # Each instance's scanner works: it alone is running when a few rows fall due.
            with paused(b):
                await make_due(first)
                await redelivered(first)
            with paused(a):
                await make_due(second)
                await redelivered(second)
            # Then both claim the bulk side by side.
            await make_due(rest)
            await redelivered(rest)
            await asyncio.sleep(0.5)  # a second pass of each instance, which must find nothing
            messages = await rabbit.drain(amqp, settings.queue_name("inventory"), wait=1.0)
            per_instance = [i.log.read_text().count("redelivered due-") for i in (a, b)]
    finally:
        await rabbit.delete_topology(settings.amqp_url, settings)

    published = Counter(m.message_id for m in messages)
    assert len(published) == DUE_ROWS
    assert set(published.values()) == {1}, "a due row was published twice"
    assert all(m.headers["x-rmsg-attempt"] == 2 for m in messages)
    assert sum(per_instance) == DUE_ROWS
    assert min(per_instance) >= ALONE, per_instance
    attempts = await db.fetch("SELECT DISTINCT attempts FROM rmsg_delivery")
    assert [r["attempts"] for r in attempts] == [2]
    print(f"redeliveries per instance: {per_instance}")
