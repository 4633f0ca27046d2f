"""A scanner pass reads the due rows through partial indexes, not the finished ones."""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from reliable_msg.service.store import CLAIM_CHECKS, CLAIM_DELIVERIES

FINISHED = 20_000
Scan = tuple[str, str, str | None]


def scans(plan: dict[str, Any]) -> list[Scan]:
    """(node type, relation, index) of every scan node in a JSON plan."""
    found = []
    if "Relation Name" in plan:
        found.append((plan["Node Type"], plan["Relation Name"], plan.get("Index Name")))
    for child in plan.get("Plans", []):
        found.extend(scans(child))
    return found


async def plan_of(
    db: asyncpg.Connection, sql: str, *args: Any
) -> list[tuple[str, str, str | None]]:
    # Without ANALYZE, EXPLAIN plans the statement and runs nothing.
    raw = await db.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args)
    return scans(json.loads(raw)[0]["Plan"])


async def test_claims_use_the_partial_indexes_with_many_finished_rows(
    db: asyncpg.Connection,
) -> None:
    await db.execute(
        """
        INSERT INTO rmsg_message (id, topic, producer, payload, status, groups, finished_at)
        SELECT 'old-' || i, 'order.paid', 'order', '{}', 'done', '{inventory}', now()
        FROM generate_series(1, $1) AS i
        """,
        FINISHED,
    )
    await db.execute(
        """
        INSERT INTO rmsg_delivery (message_id, group_name, status, next_attempt_at, done_at)
        SELECT id, 'inventory', 'done', now(), now() FROM rmsg_message
        """
    )
    await db.execute(
        """
        INSERT INTO rmsg_message (id, topic, producer, payload, status, groups, next_check_at)
        SELECT 'new-' || i, 'order.paid', 'order', '{}', 'pending', '{inventory}', now()
        FROM generate_series(1, 10) AS i
        """
    )
    await db.execute("ANALYZE rmsg_message")
    await db.execute("ANALYZE rmsg_delivery")

    checks = await plan_of(db, CLAIM_CHECKS, "pending", 500, 60.0, [])
    deliveries = await plan_of(db, CLAIM_DELIVERIES, "sent", 500)

    assert ("Index Scan", "rmsg_message", "rmsg_message_check_due") in checks, checks
    assert ("Index Scan", "rmsg_delivery", "rmsg_delivery_due") in deliveries, deliveries
    for node, relation, _ in checks + deliveries:
        assert node != "Seq Scan", f"sequential scan of {relation}"
