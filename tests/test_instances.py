"""Several ``serve`` processes over one database: each due row is handled once a pass."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg

from reliable_msg.settings import Settings
from tests.helpers import rabbit
from tests.helpers.processes import serving, toml
from tests.helpers.waiting import wait_until

DUE_ROWS = 1000


async def test_two_instances_redeliver_each_due_row_once(
    settings: Settings,
    db: asyncpg.Connection,
    amqp: aio_pika.abc.AbstractConnection,
    tmp_path: Path,
) -> None:
    config: dict[str, Any] = settings.model_dump(
        mode="json", exclude={"producers", "groups", "admin_token"}
    )
    config["groups"] = {name: {"topics": g.topics} for name, g in settings.groups.items()}
    # One redelivery each: after it, the next one is an hour away.
    config["redelivery"] = {"ack_timeout": 3600.0, "jitter": 0.0}
    config["scanner"] = {"interval": 0.05, "batch": 50}
    path = tmp_path / "config.toml"
    path.write_text(toml(config))

    try:
        with serving(path, 2, tmp_path) as instances:
            await db.execute(
                """
                INSERT INTO rmsg_message (id, topic, producer, payload, status, groups,
                                          remaining, sent_at)
                SELECT 'due-' || i, 'order.paid', 'order', '{}', 'sent', '{inventory}', 1, now()
                FROM generate_series(1, $1) AS i
                """,
                DUE_ROWS,
            )
            await db.execute(
                """
                INSERT INTO rmsg_delivery (message_id, group_name, status, attempts,
                                           next_attempt_at)
                SELECT id, 'inventory', 'sent', 1, now() - interval '1 second'
                FROM rmsg_message
                """
            )

            async def all_redelivered() -> bool:
                n = await db.fetchval("SELECT count(*) FROM rmsg_delivery WHERE attempts = 2")
                return bool(n == DUE_ROWS)

            await wait_until(all_redelivered, within=60, every=0.2)
            await asyncio.sleep(0.5)  # a second pass of each instance, which must find nothing
            messages = await rabbit.drain(amqp, settings.queue_name("inventory"), wait=1.0)
            per_instance = [log.read_text().count("redelivered due-") for _, log in instances]
    finally:
        await rabbit.delete_topology(settings.amqp_url, settings)

    published = Counter(m.message_id for m in messages)
    assert len(published) == DUE_ROWS
    assert set(published.values()) == {1}, "a due row was published twice"
    assert all(m.headers["x-rmsg-attempt"] == 2 for m in messages)
    assert sum(per_instance) == DUE_ROWS
    attempts = await db.fetch("SELECT DISTINCT attempts FROM rmsg_delivery")
    assert [r["attempts"] for r in attempts] == [2]
    print(f"redeliveries per instance: {per_instance}")
