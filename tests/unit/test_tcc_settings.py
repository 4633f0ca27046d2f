"""``[participants.<name>]`` and ``[tcc]``: what loads, and every bad value refused at load
with the setting named."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from reliable_msg.errors import ConfigError
from reliable_msg.service.settings import Settings, load_settings
from reliable_msg.tcc import Op

TOKEN = "inventory-token-0123456789"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RMSG_"):
            monkeypatch.delenv(name)


def load(tmp_path: Path, toml: str) -> Settings:
    path = tmp_path / "config.toml"
    path.write_text(toml)
    return load_settings(path)


def participant(url: str = "http://127.0.0.1:8501/tcc", **more: Any) -> dict[str, Any]:
    return {"participants": {"inventory": {"url": url, "token": TOKEN, **more}}}


def test_defaults() -> None:
    tcc = load_settings(None).tcc
    assert (tcc.call_timeout, tcc.backoff_base, tcc.backoff_cap, tcc.jitter) == (10, 1, 300, 0.2)
    assert (tcc.stalled_after, tcc.lease, tcc.max_timeout) == (600, 30, 3600)
    assert (tcc.max_branches, tcc.max_payload_bytes) == (32, 64 * 1024)
    assert tcc.retention == 7 * 24 * 3600
    assert load_settings(None).participants == {}


def test_a_participant_from_the_file_and_its_token_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RMSG_PARTICIPANTS__INVENTORY__TOKEN", TOKEN)
    settings = load(
        tmp_path,
        '[participants.inventory]\nurl = "https://inventory.internal/tcc/"\n'
        "[tcc]\ncall_timeout = 4\nbackoff_cap = 60\n",
    )
    inventory = settings.participants["inventory"]
    assert inventory.token.get_secret_value() == TOKEN
    assert inventory.op_url(Op.CONFIRM) == "https://inventory.internal/tcc/confirm"
    assert inventory.op_url(Op.TRY) == "https://inventory.internal/tcc/try"
    assert settings.call_timeout("inventory") == 4
    assert (settings.tcc.backoff_cap, settings.tcc.backoff_base) == (60, 1)


def test_a_participant_only_from_the_environment_needs_its_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RMSG_PARTICIPANTS__INVENTORY__TOKEN", TOKEN)
    with pytest.raises(ConfigError, match=r"participants\.inventory\.url: Field required"):
        load_settings(None)
    monkeypatch.setenv("RMSG_PARTICIPANTS__INVENTORY__URL", "http://inventory:8501")
    settings = load_settings(None)
    assert settings.participants["inventory"].op_url(Op.CANCEL) == "http://inventory:8501/cancel"


def test_a_participant_without_a_token_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"participants\.inventory\.token: Field required"):
        load(tmp_path, '[participants.inventory]\nurl = "http://127.0.0.1:8501"\n')


def test_a_participants_own_timeout() -> None:
    settings = load_settings(None, **participant(timeout=25))
    assert settings.call_timeout("inventory") == 25
    with pytest.raises(ConfigError, match=r"participants\.inventory\.timeout .* tcc\.lease"):
        load_settings(None, **participant(timeout=30))
    with pytest.raises(ConfigError, match=r"participants\.inventory\.timeout"):
        load_settings(None, **participant(timeout=0))


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://inventory/tcc", "URL scheme should be 'http' or 'https'"),
        ("inventory:8501/tcc", "URL scheme"),
        ("not a url", "valid URL"),
        ("", "valid URL"),
        ("http://user:secret@inventory/tcc", "credentials"),
        ("http://user@inventory/tcc", "credentials"),
        ("http://inventory/tcc?x=1", "query"),
        ("http://inventory/tcc#frag", "fragment"),
    ],
)
def test_a_bad_url_is_refused(url: str, why: str) -> None:
    with pytest.raises(ConfigError, match=r"participants\.inventory\.url") as refused:
        load_settings(None, **participant(url))
    assert why in str(refused.value)


def test_a_bad_participant_name_is_refused() -> None:
    bad = {"participants": {"Inventory": {"url": "http://inventory", "token": TOKEN}}}
    with pytest.raises(ConfigError, match="participant name 'Inventory'"):
        load_settings(None, **bad)


@pytest.mark.parametrize(
    ("kind", "section"),
    [
        ("participant", {"url": "http://inventory", "token": TOKEN}),
        ("producer", {"check_url": "http://inventory/check", "token": TOKEN}),
        ("group", {"topics": ["order.*"], "token": TOKEN}),
    ],
)
def test_a_name_with_a_trailing_newline_is_refused(kind: str, section: dict[str, Any]) -> None:
    """``$`` of ``re.match`` also matches before a final newline: "inventory\\n" passed."""
    with pytest.raises(ConfigError, match=rf"{kind} name 'inventory\\n'"):
        load_settings(None, **{f"{kind}s": {"inventory\n": section}})


def test_a_topic_pattern_with_a_trailing_newline_is_refused() -> None:
    group = {"topics": ["order.*\n"], "token": TOKEN}
    with pytest.raises(ConfigError, match=r"groups\.inventory\.topics"):
        load_settings(None, groups={"inventory": group})


def test_a_participant_sharing_a_token_is_refused() -> None:
    with pytest.raises(ConfigError, match="same token"):
        load_settings(None, admin_token=TOKEN, **participant())


def test_an_unknown_participant_setting_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"participants\.inventory\.check_url"):
        load_settings(None, **participant(check_url="http://inventory"))


@pytest.mark.parametrize(
    "name",
    [
        "call_timeout",
        "backoff_base",
        "backoff_cap",
        "stalled_after",
        "lease",
        "max_timeout",
        "max_branches",
        "max_payload_bytes",
        "retention",
    ],
)
@pytest.mark.parametrize("value", [0, -1])
def test_a_non_positive_number_is_refused(name: str, value: int) -> None:
    with pytest.raises(ConfigError, match=rf"tcc\.{name}"):
        load_settings(None, tcc={name: value})


@pytest.mark.parametrize("jitter", [-0.1, 1, 1.5])
def test_jitter_outside_zero_to_one_is_refused(jitter: float) -> None:
    with pytest.raises(ConfigError, match=r"tcc\.jitter"):
        load_settings(None, tcc={"jitter": jitter})
    assert load_settings(None, tcc={"jitter": 0}).tcc.jitter == 0


def test_a_cap_below_the_base_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"tcc\.backoff_cap \(5 s\) must be at least"):
        load_settings(None, tcc={"backoff_base": 10, "backoff_cap": 5})
    assert load_settings(None, tcc={"backoff_base": 5, "backoff_cap": 5}).tcc.backoff_cap == 5


def test_a_lease_not_longer_than_a_call_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"tcc\.lease \(10 s\) must be longer"):
        load_settings(None, tcc={"lease": 10})


def test_an_unknown_tcc_setting_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"tcc\.retries"):
        load_settings(None, tcc={"retries": 3})


def test_the_commented_participant_of_the_example_config_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "config.example.toml"
    text = example.read_text()
    for line in ("[participants.credit]", 'url = "http://127.0.0.1:8502/tcc"', "timeout = 20.0"):
        assert f"# {line}\n" in text
        text = text.replace(f"# {line}\n", f"{line}\n")
    with pytest.raises(ConfigError, match=r"participants\.credit\.token"):
        load(tmp_path, text)
    monkeypatch.setenv("RMSG_PARTICIPANTS__CREDIT__TOKEN", TOKEN)
    settings = load(tmp_path, text)
    assert settings.call_timeout("credit") == 20
    assert settings.participants["credit"].op_url(Op.CONFIRM) == "http://127.0.0.1:8502/tcc/confirm"
