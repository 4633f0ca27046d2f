"""The cost of a scanner pass with few and with many finished messages in the table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import asyncpg

from reliable_msg.service.migrate import migrate
from reliable_msg.service.store import CLAIM_CHECKS, CLAIM_DELIVERIES

#: Due rows each scanner finds in every measured pass.
DUE = 100


async def table_with(dsn: str, finished: int, tick: Callable[[int], None]) -> None:
    """Make ``dsn`` hold ``finished`` done messages (with deliveries) plus the due rows.

    A database that already holds that many is reused: building millions of rows takes
    minutes, measuring takes seconds.
    """
    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        have = await conn.fetchval("SELECT count(*) FROM rmsg_message WHERE status = 'done'")
        if have != finished:
            await conn.execute("TRUNCATE rmsg_message CASCADE")
            step = 250_000
            for start in range(0, finished, step):
                end = min(finished, start + step)
                await conn.execute(_FILL, start + 1, end)
                tick(end - start)
        await conn.execute(
            "DELETE FROM rmsg_message WHERE status <> 'done';" + _DUE.format(due=DUE)
        )
        await conn.execute("VACUUM ANALYZE rmsg_message")
        await conn.execute("VACUUM ANALYZE rmsg_delivery")
    finally:
        await conn.close()


_FILL = """
WITH m AS (
    INSERT INTO rmsg_message (id, topic, producer, payload, status, groups, remaining,
                              created_at, sent_at, finished_at)
    SELECT 'old-' || i, 'order.paid', 'order', '{"order_id": 1, "amount": "19.90"}', 'done',
           '{inventory}', 0, now() - interval '1 day', now() - interval '1 day', now()
    FROM generate_series($1::int, $2::int) AS i
    RETURNING id
)
INSERT INTO rmsg_delivery (message_id, group_name, status, next_attempt_at, done_at)
SELECT id, 'inventory', 'done', now(), now() FROM m
"""

_DUE = """
INSERT INTO rmsg_message (id, topic, producer, payload, status, groups, next_check_at)
SELECT 'pending-' || i, 'order.paid', 'order', '{{}}', 'pending', '{{inventory}}', now()
FROM generate_series(1, {due}) AS i;
INSERT INTO rmsg_message (id, topic, producer, payload, status, groups, remaining, sent_at)
SELECT 'sent-' || i, 'order.paid', 'order', '{{}}', 'sent', '{{inventory}}', 1, now()
FROM generate_series(1, {due}) AS i;
INSERT INTO rmsg_delivery (message_id, group_name, status, next_attempt_at)
SELECT 'sent-' || i, 'inventory', 'sent', now() - interval '1 second'
FROM generate_series(1, {due}) AS i;
"""


async def pass_cost(dsn: str, repeats: int = 30) -> float:
    """Median milliseconds of one pass's claims (both scanners), each rolled back so
    every repeat finds the same due rows."""
    conn = await asyncpg.connect(dsn)
    try:
        times = []
        for _ in range(repeats):
            tx = conn.transaction()
            await tx.start()
            started = time.perf_counter()
            checks = await conn.fetch(CLAIM_CHECKS, "pending", 500, 60.0, [])
            deliveries = await conn.fetch(CLAIM_DELIVERIES, "sent", 500)
            times.append((time.perf_counter() - started) * 1000)
            await tx.rollback()
            if len(checks) != DUE or len(deliveries) != DUE:
                raise RuntimeError(
                    f"expected {DUE} due rows, found {len(checks)}, {len(deliveries)}"
                )
        return statistics.median(times)
    finally:
        await conn.close()
