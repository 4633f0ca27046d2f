"""RabbitMQ as the demo sees it: its own objects, removed before a run and watched during
it, and the broker's application, stopped and started again for the outage."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import aiormq

from reliable_msg.harness import servers

from .errors import DemoError
from .options import Names
from .processes import run_logged

#: Seconds RabbitMQ gets to answer again after ``start_app``.
COMEBACK = 120.0


@dataclass(frozen=True, slots=True)
class QueueState:
    ready: int  #: messages waiting for a consumer
    consumers: int


async def reset(url: str, names: Names, groups: Sequence[str]) -> None:
    """Delete the demo's queues and exchanges; the service declares them afresh."""
    queues = [q for g in groups for q in names.queues(g)] + [names.probe_queue]
    connection = await aio_pika.connect(url)
    try:
        for queue in queues:
            async with connection.channel() as channel:
                await channel.queue_delete(queue)
        for exchange in (names.exchange, names.dead_letter_exchange):
            async with connection.channel() as channel:
                await channel.exchange_delete(exchange)
    finally:
        await connection.close()


async def queue_states(url: str, names: Names, groups: Sequence[str]) -> dict[str, QueueState]:
    """Each group's queue now; a queue not declared yet counts as empty, unconsumed."""
    states = {}
    connection = await aio_pika.connect(url)
    try:
        for group in groups:
            states[group] = await _state(connection, names.queue(group))
    finally:
        await connection.close()
    return states


async def _state(connection: aio_pika.abc.AbstractConnection, queue: str) -> QueueState:
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return QueueState(0, 0)  # the failed passive declare closed the channel
    result = declared.declaration_result
    await channel.close()
    return QueueState(result.message_count or 0, result.consumer_count or 0)


class Outage:
    """RabbitMQ's application stopped (``rabbitmqctl stop_app``) and started again.

    :attr:`down` is true from the moment :meth:`stop` is called until :meth:`restore`
    saw RabbitMQ take a connection again, so a caller's ``finally`` knows whether it
    still has to restore it. The times are monotonic seconds since ``started``.
    """

    def __init__(self, url: str, log: Path, started: float) -> None:
        self._url = url
        self._log = log
        self._started = started
        self.down = False
        self.stopped_at: float | None = None
        self.started_at: float | None = None
        self.answering_at: float | None = None

    async def stop(self) -> None:
        self.down = True
        await self._ctl("stop_app")
        self.stopped_at = self._now()

    async def restore(self) -> None:
        """Start the application, then wait until RabbitMQ takes a connection again."""
        await self._ctl("start_app")
        self.started_at = self._now()
        if not await servers.wait_until(self._answers, within=COMEBACK, every=0.2):
            raise DemoError(f"RabbitMQ does not answer {COMEBACK:.0f} s after start_app")
        self.answering_at = self._now()
        self.down = False

    def _now(self) -> float:
        return time.monotonic() - self._started

    async def _ctl(self, command: str) -> None:
        await run_logged(servers.rabbitmqctl(command), self._log)

    async def _answers(self) -> bool:
        return await servers.rabbitmq_answers(self._url)
