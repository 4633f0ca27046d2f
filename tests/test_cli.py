"""The command line: clear one-line errors for bad configuration, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DATABASE_URL

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
