"""The demo consumer's injected crash, as a real ``python -m downstream_demo wms`` process
against the real service: two orders planned to kill it, queued before it starts, are
handled in one shared transaction; the first one's kill comes before the second one's
turn. The second must still kill it (at its redelivery), so that every planned kill
happens whatever the batches were, and neither order gets a second effect."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import asyncpg
import httpx
import pytest

from downstream_demo.worker import crash_marker
from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from tests.conftest import AMQP_URL, GROUP_TOKENS, PRODUCER, auth
from upstream_demo.store import message_id

ORDERS = [1, 2]
#: Starts of the consumer at most: one per planned kill, one to finish, one spare.
STARTS = len(ORDERS) + 2


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    # No redelivery by the service within the test: RabbitMQ brings the unacked back.
    return make_settings(redelivery={"ack_timeout": 60.0, "max_attempts": 16})


def consumer_env(
    settings: Settings, service_url: str, database_url: str, state: Path
) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("RMSG_", "DEMO_"))},
        "DEMO_DATABASE_URL": database_url,
        "DEMO_SERVICE_URL": service_url,
        "DEMO_WMS_TOKEN": GROUP_TOKENS["wms"],
        "DEMO_AMQP_URL": AMQP_URL,
        "DEMO_QUEUE_PREFIX": settings.queue_prefix,
        "DEMO_REDIS_URL": settings.redis_url,
        "DEMO_NAMESPACE": settings.fallback.namespace,
        "DEMO_SHARDS": str(settings.fallback.shards),
        "DEMO_POLL_INTERVAL": str(settings.fallback.poll_interval),
        "DEMO_STATE_DIR": str(state),
        "DEMO_CRASH_AFTER_EFFECT": ",".join(map(str, ORDERS)),
    }


async def acked(db: asyncpg.Connection) -> bool:
    done = await db.fetchval(
        "SELECT count(*) FROM rmsg_delivery WHERE group_name = 'wms' AND status = 'done'"
    )
    return bool(done == len(ORDERS))


async def run_until_acked(env: dict[str, str], db: asyncpg.Connection, log: Path) -> int:
    """Start the consumer again each time it dies, until wms acked every order; the
    number of times it killed itself."""
    kills = 0
    with log.open("ab") as out:
        for _ in range(STARTS):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "downstream_demo", "wms", env=env, stdout=out, stderr=out
            )
            for _ in range(300):
                if proc.returncode is not None or await acked(db):
                    break
                await asyncio.sleep(0.1)
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 15)
                return kills
            assert proc.returncode == -signal.SIGKILL, f"exited {proc.returncode}: see {log}"
            kills += 1
    raise AssertionError(f"not acked after {STARTS} starts: see {log}")


async def test_two_planned_kills_in_one_transaction_both_happen(
    service_url: str,
    runtime: Runtime,
    settings: Settings,
    database_url: str,
    db: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    async with httpx.AsyncClient(base_url=service_url) as http:
        for order in ORDERS:
            payload = {
                "order_id": order,
                "member_id": order,
                "sku": f"sku-{order}",
                "qty": 2,
                "amount": "10.00",
                "points": 10,
            }
            body = {"id": message_id(order), "topic": "order.paid", "payload": payload}
            r = await http.post("/v1/messages", json=body, headers=auth(PRODUCER))
            assert r.status_code == 201, r.text
            r = await http.post(f"/v1/messages/{message_id(order)}/confirm", headers=auth(PRODUCER))
            assert r.status_code == 200, r.text

    env = consumer_env(settings, service_url, database_url, tmp_path / "state")
    log = tmp_path / "wms.log"
    try:
        kills = await run_until_acked(env, db, log)
        effects = await db.fetch(
            "SELECT order_id, count(*) AS n FROM wms.delivery_orders GROUP BY order_id"
        )
    finally:
        await db.execute("DROP SCHEMA IF EXISTS wms CASCADE")

    text = log.read_text()
    assert kills == len(ORDERS), text
    assert all((tmp_path / "state" / crash_marker("wms", o)).exists() for o in ORDERS)
    assert {r["order_id"]: r["n"] for r in effects} == dict.fromkeys(ORDERS, 1)
    # The case this test is about did happen: one order died at its redelivery.
    assert "committed before, redelivered" in text, text
