"""The operators' TCC commands, run as ``reliable-msg`` processes against the test
database directly: ``tcc list`` (filters), ``tcc show`` (branches, event log) and
``tcc retry``."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from tests.conftest import PRODUCER, auth
from tests.helpers.service import write_config

#: Where nothing listens: every Confirm and Cancel call fails.
NOWHERE = "http://127.0.0.1:9/tcc"


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(
        participants={
            "inventory": {"url": f"{NOWHERE}/inventory", "token": "inventory-tcc-token"},
            "wms": {"url": f"{NOWHERE}/wms", "token": "wms-tcc-token"},
        },
        tcc={
            "call_timeout": 1.0,
            "lease": 5.0,
            "backoff_base": 60.0,
            "backoff_cap": 60.0,
            "stalled_after": 0.5,
        },
    )


@pytest.fixture
def cli(settings: Settings, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    config = write_config(settings, tmp_path / "config.toml")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "reliable_msg", "--config", str(config), "tcc", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "250", "RMSG_LOG_LEVEL": "warning"},
        )

    return run


async def begin(client: httpx.AsyncClient, gid: str, *branches: tuple[str, str]) -> None:
    """Begin ``gid`` and register ``(participant, branch)`` branches."""
    body: dict[str, Any] = {"gid": gid, "timeout": 600.0}
    assert (
        await client.post("/v1/tcc/transactions", json=body, headers=auth(PRODUCER))
    ).status_code == 201
    items = [{"participant": p, "branch": b, "payload": {"qty": 1}} for p, b in branches]
    registered = await client.post(
        f"/v1/tcc/transactions/{gid}/branches", json={"branches": items}, headers=auth(PRODUCER)
    )
    assert registered.status_code == 200, registered.text


async def test_tcc_commands_list_show_and_retry(
    client: httpx.AsyncClient,
    runtime: Runtime,
    db: asyncpg.Connection,
    cli: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    await begin(client, "cli-trying", ("inventory", "b1"))
    await begin(client, "cli-stuck", ("inventory", "b1"), ("wms", "b2"))
    cancel = await client.post("/v1/tcc/transactions/cli-stuck/cancel", headers=auth(PRODUCER))
    assert cancel.status_code == 200, cancel.text
    await runtime.tcc_driver.run_once()  # both Cancels fail: nothing listens
    await asyncio.sleep(0.6)  # past stalled_after
    await runtime.tcc_driver.run_once()  # flags it stalled (its calls wait 60 s)

    listed = cli("list")
    assert listed.returncode == 0, listed.stderr
    assert "cli-trying" in listed.stdout and "cli-stuck" in listed.stdout
    assert "2 transaction(s)" in listed.stdout
    for args, gid in [
        (("--status", "cancelling"), "cli-stuck"),
        (("--status", "trying"), "cli-trying"),
        (("--participant", "wms"), "cli-stuck"),
        (("--stalled",), "cli-stuck"),
    ]:
        one = cli("list", *args)
        assert one.returncode == 0, one.stderr
        assert gid in one.stdout and "1 transaction(s)" in one.stdout, (args, one.stdout)
    assert "STALLED" in cli("list", "--stalled").stdout
    assert cli("list", "--status", "lost").returncode == 2

    shown = cli("show", "cli-stuck")
    assert shown.returncode == 0, shown.stderr
    error = await db.fetchval(
        "SELECT last_error FROM rmsg_tcc_branch WHERE gid = 'cli-stuck' AND branch = 'b2'"
    )
    assert error and error in shown.stdout
    for text in ("cancelling (STALLED)", "inventory", "wms", "register", "failed", "b2"):
        assert text in shown.stdout, text
    missing = cli("show", "no-such-gid")
    assert missing.returncode == 1 and "no-such-gid" in missing.stderr

    retried = cli("retry", "cli-stuck")
    assert retried.returncode == 0, retried.stderr
    assert "retry asked for cli-stuck (cancelling)" in retried.stdout
    events = await db.fetch("SELECT op FROM rmsg_tcc_event WHERE gid = 'cli-stuck'")
    assert "retry" in [e["op"] for e in events]
    refused = cli("retry", "cli-trying")  # not confirming or cancelling
    assert refused.returncode == 1 and "trying" in refused.stderr
