"""``amqp_url`` names one RabbitMQ node or the nodes of a cluster: a TOML list, or one
string of URLs separated by commas (``RMSG_AMQP_URL``); a bad value is refused at load
with the setting named and no password shown. The consumer SDK takes the same forms."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from reliable_msg.errors import ConfigError
from reliable_msg.sdk.consumer import Consumer
from reliable_msg.service.settings import Settings, load_settings
from reliable_msg.transports.failover import Cursor
from reliable_msg.transports.nodes import amqp_nodes, where

A = "amqp://u:secret@rabbit-1:5672/"
B = "amqp://u:secret@rabbit-2:5672/"
C = "amqps://u:secret@rabbit-3/"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RMSG_"):
            monkeypatch.delenv(name)


def load(tmp_path: Path, line: str) -> Settings:
    path = tmp_path / "config.toml"
    path.write_text(line + "\n")
    return load_settings(path)


def test_one_url_is_one_node_and_reads_back_unchanged(tmp_path: Path) -> None:
    settings = load(tmp_path, f'amqp_url = "{A}"')
    assert settings.amqp_url == A
    assert settings.amqp_urls == (A,)
    assert Settings().amqp_urls == ("amqp://guest:guest@127.0.0.1:5672/",)


def test_a_toml_list_names_the_nodes_in_order(tmp_path: Path) -> None:
    settings = load(tmp_path, f'amqp_url = ["{A}", "{B}", "{C}"]')
    assert settings.amqp_urls == (A, B, C)


def test_the_environment_gives_them_separated_by_commas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RMSG_AMQP_URL", f"{A}, {B} ,{C}")
    # The environment wins over the file, as for every setting.
    assert load(tmp_path, 'amqp_url = "amqp://other/"').amqp_urls == (A, B, C)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ('""', "no RabbitMQ node given"),
        ("[]", "no RabbitMQ node given"),
        (f'"{A},"', "node 2 of 2 is empty"),
        (f'"{A},,{B}"', "node 2 of 3 is empty"),
        (f'["{A}", " "]', "node 2 of 2 is empty"),
        ('"http://u:secret@rabbit-1:5672/"', r"node 1 \(rabbit-1:5672\) must be an amqp://"),
        ('"rabbit-1:5672"', "must be an amqp:// or amqps:// URL"),
        (f'["{A}", "amqp://v:other@RABBIT-1/"]', r"node 2 \(rabbit-1:5672\) is node 1 again"),
        (f'"{A},{A}"', "is node 1 again"),
        ("[1]", "amqp_url"),
    ],
)
def test_a_bad_value_is_refused_at_load_without_its_password(
    tmp_path: Path, value: str, reason: str
) -> None:
    with pytest.raises(ConfigError, match=reason) as caught:
        load(tmp_path, f"amqp_url = {value}")
    assert "amqp_url" in str(caught.value)
    assert "secret" not in str(caught.value)


def test_the_same_host_on_another_port_or_vhost_is_another_node() -> None:
    nodes = ("amqp://h/", "amqp://h:5673/", "amqp://h/other", "amqps://h/")
    assert amqp_nodes(nodes) == nodes


def test_where_names_host_and_port_only() -> None:
    assert where(A) == "rabbit-1:5672"
    assert where(C) == "rabbit-3:5671"
    assert where("amqp://u:p@[::1]:5673/") == "[::1]:5673"


def test_the_cursor_goes_round_from_the_first_node() -> None:
    cursor = Cursor((A, B, C))
    assert [cursor.advance() for _ in range(5)] == [A, B, C, A, B]
    assert cursor.current == B


@pytest.mark.parametrize("urls", [A, [A, B], (A, B), f"{A},{B}"])
def test_the_consumer_takes_one_url_or_the_nodes(urls: str | Sequence[str]) -> None:
    consumer = Consumer("g", service_url="http://s", token="t", amqp_url=urls, pool=None)  # type: ignore[arg-type]
    assert consumer.amqp_urls == amqp_nodes(urls)


@pytest.mark.parametrize("urls", ["", [], [A, A], "http://x/"])
def test_the_consumer_refuses_a_bad_node_list(urls: str | Sequence[str]) -> None:
    with pytest.raises(ValueError, match="node"):
        Consumer("g", service_url="http://s", token="t", amqp_url=urls, pool=None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value",
    [
        "amqp://u:secret",  # the host forgotten: the password reads as a port
        "amqp://u:secret,more@rabbit-1/",  # a comma not percent-encoded, in the env form
    ],
)
def test_a_password_read_as_a_port_is_not_shown(value: str) -> None:
    with pytest.raises(ValueError, match="bad port") as caught:
        amqp_nodes(value)
    assert "secret" not in str(caught.value)


def test_a_comma_inside_a_listed_url_is_refused_at_load(tmp_path: Path) -> None:
    """The list is kept in the comma form: a URL with a comma would come back as two
    nodes at start-up (with a piece of its password in the error), not at load."""
    with pytest.raises(ConfigError, match=r"node 1 \(rabbit-1:5672\) has a comma") as caught:
        load(tmp_path, 'amqp_url = ["amqp://u:sec,ret@rabbit-1/"]')
    assert "sec" not in str(caught.value)
    encoded = "amqp://u:sec%2Cret@rabbit-1/"
    assert load(tmp_path, f'amqp_url = ["{encoded}", "{B}"]').amqp_urls == (encoded, B)


@pytest.mark.parametrize("other", ["amqp://h/%2F", "amqp://h/%2f", "amqp://h//", "amqp://h"])
def test_the_default_vhost_spelled_otherwise_is_the_same_node(other: str) -> None:
    with pytest.raises(ValueError, match="is node 1 again"):
        amqp_nodes(("amqp://h/", other))


def test_a_malformed_url_is_named_by_its_number() -> None:
    with pytest.raises(ValueError, match=r"node 2 is not a URL") as caught:
        amqp_nodes(f"{A},amqp://u:secret@[::1/")
    assert "secret" not in str(caught.value)
