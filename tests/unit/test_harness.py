"""The tools' harness without services: the config file a tool writes reads back as the
settings it was written from, and free ports are free and distinct."""

from __future__ import annotations

import os
import socket
import tomllib
from pathlib import Path

import pytest

from reliable_msg.harness.config import settings_data, toml, write_config
from reliable_msg.harness.ports import free_ports
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
