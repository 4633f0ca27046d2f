"""The tools' harness without services: the config file a tool writes reads back as the
settings it was written from, and free ports are free and distinct."""

from __future__ import annotations

import os
import socket
import tomllib
from pathlib import Path

import pytest

from reliable_msg.harness import servers
from reliable_msg.harness.config import settings_data, toml, write_config
from reliable_msg.harness.ports import free_ports, port_open
from reliable_msg.service.settings import Settings, load_settings


def test_a_written_config_reads_back_as_its_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.upper().startswith("RMSG_")]:
        monkeypatch.delenv(name)
    settings = Settings(
        database_url="postgresql://u@127.0.0.1:5432/x",
        admin_token='admin-"quoted"-\\token',
        producers={"order": {"check_url": "http://127.0.0.1:9/check", "token": "p" * 24}},
        groups={"credit": {"topics": ["order.*"], "token": "g" * 24}},
        participants={
            "inventory": {"url": "http://127.0.0.1:9/tcc", "token": "t" * 24, "timeout": 2.0}
        },
        fallback={"namespace": "ns", "shards": 8},
    )
    path = write_config(tmp_path / "config.toml", settings_data(settings))
    assert load_settings(path) == settings


def test_toml_leaves_none_out_and_nests_tables() -> None:
    data = {"a": 1, "b": None, "c": {"d": [True, "x"], "e": {"f": 2.5, "g": None}}}
    assert tomllib.loads(toml(data)) == {"a": 1, "c": {"d": [True, "x"], "e": {"f": 2.5}}}


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_is_open_while_something_listens_on_it() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = int(s.getsockname()[1])
        assert port_open(port)
        assert servers.wait_port(port, within=1, every=0.01)
    assert not port_open(port)
    assert servers.wait_port(port, open=False, within=1, every=0.01)


def test_waiting_for_a_port_that_stays_closed_says_so() -> None:
    assert not servers.wait_port(free_ports(1)[0], within=0.05, every=0.01)


async def test_waiting_asks_until_the_check_says_yes() -> None:
    answers = iter([False, False, True])

    async def check() -> bool:
        return next(answers)

    assert await servers.wait_until(check, within=5, every=0.01)
    assert not await servers.wait_until(_never, within=0.05, every=0.01)


async def _never() -> bool:
    return False


#: Command lines as /proc shows them (abridged): the machine's RabbitMQ node, a node of
#: the harness's cluster, a ``rabbitmqctl`` and another Erlang VM.
BEAM = b"/usr/lib/erlang/erts-13.1.5/bin/beam.smp"
MACHINE_NODE = [BEAM, b"-W", b"w", b"--", b"-home", b"/var/lib/rabbitmq", b"--", b"-noshell"]
MACHINE_NODE += [b"-s", b"rabbit", b"boot", b"-boot", b"start_sasl", b"--", b""]
CLUSTER_NODE = [*MACHINE_NODE[:-2], b"-rmsg_cluster", b"/tmp/rmsg-rabbit-cluster/2349", b""]
CTL = [BEAM, b"--", b"-noshell", b"-s", b"elixir", b"start_cli", b"-extra", b"rabbitmqctl"]


@pytest.mark.parametrize(
    ("argv", "machine"),
    [
        (MACHINE_NODE, True),
        (CLUSTER_NODE, False),
        (CTL, False),
        ([BEAM, b"-s", b"couch", b""], False),
        ([b"/usr/bin/rabbitmq-server", b"rabbit", b""], False),
        ([], False),
    ],
)
def test_only_the_machines_rabbitmq_node_is_taken_for_it(argv: list[bytes], machine: bool) -> None:
    assert servers.is_machine_rabbitmq(argv) is machine
