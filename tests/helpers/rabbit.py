"""Stopping and restarting the real RabbitMQ, and reading what it holds."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import Iterator

import aio_pika

from reliable_msg.harness import servers
from reliable_msg.service.settings import Settings

#: Seconds RabbitMQ gets to answer again after a test stopped or killed it.
COMEBACK = 120.0
#: Seconds the port of a killed node gets to close.
KILL_WAIT = 30.0


def ensure_running() -> None:
    """Start the RabbitMQ application (or the node) if it does not answer."""
    servers.start_rabbitmq(within=COMEBACK)


@contextlib.contextmanager
def stopped() -> Iterator[None]:
    """RabbitMQ's application stopped for the block, started again whatever happens."""
    servers.stop_rabbitmq_app()
    try:
        yield
    finally:
        ensure_running()


@contextlib.contextmanager
def killed() -> Iterator[None]:
    """The whole RabbitMQ node killed with SIGKILL for the block, started again after."""
    servers.kill_rabbitmq_node(within=KILL_WAIT)
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
