"""Stopping and restarting the real RabbitMQ, and reading what it holds."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator

import aio_pika

from reliable_msg.service.settings import Settings


def port_open(port: int = 5672) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


def ensure_running() -> None:
    """Start the RabbitMQ application (or the node) if it does not answer."""
    if port_open():
        return
    try:
        _ctl("start_app")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        # The node itself is gone: start it again.
        subprocess.run(["rabbitmq-server", "-detached"], check=True, timeout=60)
    deadline = time.monotonic() + 120
    while not port_open():
        if time.monotonic() > deadline:
            raise RuntimeError("RabbitMQ did not come back within 120 s")
        time.sleep(0.5)
    subprocess.run(["rabbitmqctl", "-q", "await_startup"], capture_output=True, timeout=120)


@contextlib.contextmanager
def stopped() -> Iterator[None]:
    """RabbitMQ's application stopped for the block, started again whatever happens."""
    _ctl("stop_app")
    try:
        yield
    finally:
        ensure_running()


@contextlib.contextmanager
def killed() -> Iterator[None]:
    """The whole RabbitMQ node killed with SIGKILL for the block, started again after."""
    subprocess.run(["pkill", "-KILL", "-f", "beam.smp.*rabbit"], timeout=30)
    deadline = time.monotonic() + 30
    while port_open() and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        yield
    finally:
        ensure_running()


async def drain(
    connection: aio_pika.abc.AbstractConnection, queue: str, *, wait: float = 1.0
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Every message now in ``queue`` (acked), waiting ``wait`` s after the last one."""
    channel = await connection.channel()
    q = await channel.get_queue(queue, ensure=True)
    got = []
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        message = await q.get(no_ack=False, fail=False)
        if message is None:
            await asyncio.sleep(0.05)
            continue
        await message.ack()
        got.append(message)
        deadline = time.monotonic() + wait
    await channel.close()
    return got


async def delete_topology(url: str, settings: Settings) -> None:
    """Remove the exchanges and queues a test declared."""
    connection = await aio_pika.connect(url)
    try:
        queues = [settings.probe_queue]
        for group in settings.groups:
            queues += [settings.queue_name(group), settings.dead_letter_queue(group)]
        for queue in queues:
            async with connection.channel() as channel:
                await channel.queue_delete(queue)
        for exchange in (settings.exchange, settings.dead_letter_exchange):
            async with connection.channel() as channel:
                await channel.exchange_delete(exchange)
    finally:
        await connection.close()


def remove_stale(prefix: str) -> None:
    """Delete queues named ``<prefix><pid>.…`` whose test run is gone (a killed run
    leaves its queues behind, and a node with thousands of them restarts slowly)."""
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    for name in listed.stdout.split():
        if name.startswith(prefix) and not _alive(name[len(prefix) :].split(".")[0]):
            subprocess.run(
                ["rabbitmqctl", "-q", "delete_queue", name], timeout=60, capture_output=True
            )


def _alive(pid: str) -> bool:
    return pid.isdigit() and os.path.exists(f"/proc/{pid}")
