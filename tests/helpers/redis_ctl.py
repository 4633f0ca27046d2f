"""Stopping and restarting the real Redis of this machine."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator

START = [
    "redis-server",
    "--daemonize",
    "yes",
    "--bind",
    "127.0.0.1",
    "-::1",
    "--port",
    "6379",
    "--save",
    "",
    "--appendonly",
    "no",
    "--dir",
    "/var/lib/redis",
    "--logfile",
    "/var/log/redis/ci.log",
]


def port_open(port: int = 6379) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def ensure_running() -> None:
    if port_open():
        return
    subprocess.run(START, check=True, timeout=30)
    deadline = time.monotonic() + 30
    while not port_open():
        if time.monotonic() > deadline:
            raise RuntimeError("Redis did not come back within 30 s")
        time.sleep(0.2)


@contextlib.contextmanager
def stopped() -> Iterator[None]:
    """Redis shut down for the block, started again whatever happens."""
    subprocess.run(
        ["redis-cli", "-p", "6379", "shutdown", "nosave"], timeout=30, capture_output=True
    )
    deadline = time.monotonic() + 10
    while port_open() and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        yield
    finally:
        ensure_running()
