"""The operators' commands, run as ``reliable-msg`` processes against the test database,
RabbitMQ and Redis directly, with no service running."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import asyncpg
import httpx
import pytest

from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from tests.conftest import GROUP_TOKENS, PRODUCER, auth
from tests.helpers.service import write_config


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(redelivery={"ack_timeout": 0.3, "max_attempts": 1})


@pytest.fixture
def cli(settings: Settings, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    config = write_config(settings, tmp_path / "config.toml")

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "reliable_msg", "--config", str(config), *args],
            capture_output=True,
            text=True,
            input=stdin,
            timeout=60,
            env={**os.environ, "COLUMNS": "200", "RMSG_LOG_LEVEL": "warning"},
        )

    return run


async def populate(client: httpx.AsyncClient, runtime: Runtime) -> None:
    """cli-done done, cli-dead-1 and cli-dead-2 dead in every group, cli-pending pending."""
    for id in ("cli-done", "cli-dead-1", "cli-dead-2", "cli-pending"):
        body = {"id": id, "topic": "order.paid", "payload": {"order": id}}
        assert (await client.post("/v1/messages", json=body, headers=auth(PRODUCER))).is_success
    for id in ("cli-done", "cli-dead-1", "cli-dead-2"):
        r = await client.post(f"/v1/messages/{id}/confirm", headers=auth(PRODUCER))
        assert r.is_success
    for token in GROUP_TOKENS.values():
        assert (await client.post("/v1/messages/cli-done/ack", headers=auth(token))).is_success
    await asyncio.sleep(0.4)  # past ack_timeout: the one delivery allowed is used up
    await runtime.redelivery.run_once()


async def statuses(db: asyncpg.Connection) -> dict[str, str]:
    rows = await db.fetch("SELECT id, status FROM rmsg_message")
    return {r["id"]: r["status"] for r in rows}


async def test_admin_commands_work_on_the_database_and_broker_directly(
    client: httpx.AsyncClient,
    runtime: Runtime,
    db: asyncpg.Connection,
    cli: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    await populate(client, runtime)
    assert await statuses(db) == {
        "cli-done": "done",
        "cli-dead-1": "dead",
        "cli-dead-2": "dead",
        "cli-pending": "pending",
    }

    status = cli("status")
    assert status.returncode == 0, status.stderr
    # pending, sent, done, cancelled, dead
    assert re.search(r"│\s+1\s+│\s+0\s+│\s+1\s+│\s+0\s+│\s+2\s+│", status.stdout), status.stdout
    assert re.search(r"│ inventory\s+│\s+0\s+│\s+1\s+│\s+2\s+│\s+0\s+│", status.stdout)
    assert "mode: normal" in status.stdout

    listed = cli("messages", "list", "--status", "dead")
    assert listed.returncode == 0, listed.stderr
    assert "cli-dead-1" in listed.stdout and "cli-dead-2" in listed.stdout
    assert "cli-done" not in listed.stdout and "2 message(s)" in listed.stdout

    shown = cli("messages", "show", "cli-dead-1")
    assert shown.returncode == 0, shown.stderr
    for text in ("prepare", "confirm", "not acked by inventory", '"order": "cli-dead-1"'):
        assert text in shown.stdout, text
    missing = cli("messages", "show", "no-such-id")
    assert missing.returncode == 1 and "no message 'no-such-id'" in missing.stderr

    one = cli("requeue", "cli-dead-1")
    assert one.returncode == 0, one.stderr
    assert "requeued cli-dead-1: now sent" in one.stdout
    assert (await statuses(db))["cli-dead-1"] == "sent"
    again = cli("requeue", "cli-dead-1")
    assert again.returncode == 1 and "not dead" in again.stderr

    refused = cli("requeue", "--group", "inventory")  # asks, and stdin says nothing
    assert refused.returncode == 1
    group = "SELECT status FROM rmsg_delivery WHERE message_id = 'cli-dead-2' AND group_name = $1"
    assert await db.fetchval(group, "inventory") == "dead"
    bulk = cli("requeue", "--group", "inventory", "--yes")
    assert bulk.returncode == 0, bulk.stderr
    assert "republished 1 dead deliveries of group inventory" in bulk.stdout
    assert await db.fetchval(group, "inventory") == "sent"
    assert await db.fetchval(group, "credit") == "dead"
    assert cli("requeue").returncode == 2
    assert cli("requeue", "--group", "nobody", "--yes").returncode == 1

    kept = cli("purge", "--older-than", "7d")
    assert kept.returncode == 0 and "purged 0" in kept.stdout
    purged = cli("purge", "--older-than", "0s")
    assert purged.returncode == 0 and "purged 1" in purged.stdout
    assert "cli-done" not in await statuses(db)
    history = "SELECT count(*) FROM rmsg_transition WHERE message_id = $1"
    assert await db.fetchval(history, "cli-done") == 0  # purged with its message
    assert await db.fetchval(history, "cli-dead-1") > 0
    assert cli("purge", "--older-than", "soon").returncode == 2
