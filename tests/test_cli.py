"""The command line: clear one-line errors for bad configuration, never a traceback;
``serve`` runs the scanners unless ``scanner.enabled = false`` or ``--no-scanners``."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import asyncpg
import httpx
import pytest

from reliable_msg.harness.ports import free_port
from reliable_msg.harness.process import serve_argv, stop, wait_ready
from reliable_msg.service.settings import Settings
from tests.conftest import DATABASE_URL, PRODUCER, auth
from tests.helpers.checkback import ProducerEndpoint, checked_at
from tests.helpers.service import GRACE, STARTUP, Instance, remove_traces, write_config
from tests.helpers.waiting import wait_until

GOOD = """
admin_token = "a"
[producers.order]
check_url = "http://127.0.0.1:8001/check"
token = "p"
[groups.inventory]
topics = ["order.paid"]
token = "g"
"""


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reliable_msg", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(GOOD)
    result = run("--config", str(path), "check-config")
    assert result.returncode == 0, result.stderr
    assert "group inventory: queue rmsg.inventory <- order.paid" in result.stdout
    assert result.stdout.strip().endswith("configuration ok")


def test_check_config_prints_the_tcc_participants(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(GOOD + '[participants.credit]\nurl = "http://credit:8502/tcc"\n')
    result = run(
        "--config", str(path), "check-config", env={"RMSG_PARTICIPANTS__CREDIT__TOKEN": "c"}
    )
    assert result.returncode == 0, result.stderr
    assert "participant credit: http://credit:8502/tcc (calls time out after 10 s)" in (
        result.stdout
    )


def test_env_overrides_the_file_and_supplies_tokens(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(GOOD.replace('token = "g"\n', ""))
    result = run(
        "--config",
        str(path),
        "check-config",
        env={"RMSG_GROUPS__INVENTORY__TOKEN": "from-env", "RMSG_QUEUE_PREFIX": "shop."},
    )
    assert result.returncode == 0, result.stderr
    assert "queue shop.inventory" in result.stdout
    assert "no token" not in result.stderr


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "config file not found"),
        ("this is = = not toml", "cannot read config file"),
        (GOOD.replace('["order.paid"]', "[]"), "groups.inventory.topics"),
        (GOOD.replace('"http://127.0.0.1:8001/check"', '"not a url"'), "check_url"),
        (GOOD + "\nport = 'eighty'\n", "port"),
        (GOOD + "\nunknown_setting = 1\n", "unknown_setting"),
        (GOOD.replace("[groups.inventory]", "[groups.Inventory]"), "lower case"),
        (GOOD.replace('["order.paid"]', '["order..paid"]'), "not a topic pattern"),
        (GOOD + '[participants.credit]\ntoken = "c"\n', "participants.credit.url"),
        (GOOD + '[participants.credit]\nurl = "http://credit"\n', "participants.credit.token"),
        (GOOD + "[tcc]\njitter = 1\n", "tcc.jitter"),
    ],
    ids=[
        "missing",
        "not-toml",
        "no-topics",
        "bad-url",
        "bad-type",
        "unknown-key",
        "upper-case-name",
        "bad-pattern",
        "participant-without-url",
        "participant-without-token",
        "bad-tcc",
    ],
)
@pytest.mark.parametrize("command", ["check-config", "serve", "migrate"])
def test_bad_config_is_one_clear_line(
    tmp_path: Path, content: str | None, expected: str, command: str
) -> None:
    path = tmp_path / "bad.toml"
    if content is not None:
        path.write_text(content)
    result = run("--config", str(path), command, env={"RMSG_DATABASE_URL": DATABASE_URL})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("reliable-msg: ")
    assert expected in line


def test_same_token_for_two_principals_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.toml"
    path.write_text(GOOD.replace('token = "g"', 'token = "p"'))
    result = run("--config", str(path), "check-config")
    assert result.returncode == 2
    assert "same token" in result.stderr


@pytest.mark.parametrize(
    ("enabled", "options", "checked"),
    [(True, (), True), (False, (), False), (True, ("--no-scanners",), False)],
    ids=["enabled", "enabled-false", "no-scanners"],
)
async def test_serve_runs_the_scanners_unless_the_config_or_the_flag_says_not(
    make_settings: Callable[..., Settings],
    endpoint: tuple[ProducerEndpoint, int],
    db: asyncpg.Connection,
    tmp_path: Path,
    enabled: bool,
    options: tuple[str, ...],
    checked: bool,
) -> None:
    """A pending message is checked back (the check-back scanner's work) only by a
    ``serve`` that runs the scanners: not with ``scanner.enabled = false`` in its file
    (README: "runs the scanners unless scanner.enabled = false or --no-scanners")."""
    producer, port = endpoint
    settings = make_settings(
        producers=checked_at(port, PRODUCER),
        scanner={"interval": 0.1, "enabled": enabled},
        checkback={"after": 0.2},
    )
    config = write_config(settings, tmp_path / "config.toml")
    port = free_port()
    argv = serve_argv(config, *options, "--port", str(port))
    instance = Instance("serve", argv, dict(os.environ), tmp_path / "serve.log", port=port)
    instance.start()
    try:
        await wait_ready(instance.url, instance, within=STARTUP)
        async with httpx.AsyncClient(base_url=instance.url, timeout=10.0) as http:
            body = {"id": "idle", "topic": "order.paid", "payload": {}}
            r = await http.post("/v1/messages", json=body, headers=auth(PRODUCER))
            assert r.status_code == 201, r.text
        if checked:
            await wait_until(lambda: producer.calls["idle"] > 0, within=15)
        else:
            # Due for its check-back, and twenty scanner intervals past that.
            await wait_until(lambda: _past(db, "idle", seconds=2.0), within=15, every=0.1)
            assert producer.calls["idle"] == 0, instance.log_tail()
            row = await db.fetchrow(
                "SELECT status, check_attempts FROM rmsg_message WHERE id = 'idle'"
            )
            assert row is not None
            assert (row["status"], row["check_attempts"]) == ("pending", 0)
    finally:
        await asyncio.to_thread(stop, [instance], GRACE)
        await remove_traces(settings)


async def _past(db: asyncpg.Connection, id: str, *, seconds: float) -> bool:
    """``id``'s check-back has been due for more than ``seconds``."""
    return bool(
        await db.fetchval(
            "SELECT now() > next_check_at + make_interval(secs => $2)"
            " FROM rmsg_message WHERE id = $1",
            id,
            seconds,
        )
    )
