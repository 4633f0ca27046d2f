"""Retention: finished messages past the retention period are deleted, nothing else."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import asyncpg
import pytest

from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(scanner={"retention": 3600.0, "batch": 10})


async def test_purge_deletes_only_old_finished_messages(
    runtime: Runtime, db: asyncpg.Connection
) -> None:
    rows = [
        ("old-done", "done", timedelta(hours=2)),
        ("old-cancelled", "cancelled", timedelta(hours=2)),
        ("new-done", "done", timedelta(minutes=10)),
        ("old-dead", "dead", timedelta(hours=2)),
        ("old-sent", "sent", timedelta(hours=2)),
    ]
    for id, status, age in rows:
        await db.execute(
            """
            INSERT INTO rmsg_message (id, topic, producer, payload, status, groups,
                                      created_at, finished_at)
            VALUES ($1, 'order.paid', 'order', '{}', $2, '{inventory}',
                    now() - $3::interval,
                    CASE WHEN $2 IN ('done', 'cancelled') THEN now() - $3::interval END)
            """,
            id,
            status,
            age,
        )
        await db.execute(
            "INSERT INTO rmsg_delivery (message_id, group_name, status, next_attempt_at)"
            " VALUES ($1, 'inventory', 'done', now())",
            id,
        )
    # More old rows than one batch, to see the purge go on until none is left.
    await db.execute(
        """
        INSERT INTO rmsg_message (id, topic, producer, payload, status, groups, finished_at)
        SELECT 'bulk-' || i, 'order.paid', 'order', '{}', 'done', '{inventory}',
               now() - interval '1 day'
        FROM generate_series(1, 25) AS i
        """
    )

    assert await runtime.purger.run_once() == 27
    left = await db.fetch("SELECT id FROM rmsg_message ORDER BY id")
    assert [r["id"] for r in left] == ["new-done", "old-dead", "old-sent"]
    deliveries = await db.fetch("SELECT message_id FROM rmsg_delivery ORDER BY 1")
    assert [r["message_id"] for r in deliveries] == ["new-done", "old-dead", "old-sent"]
