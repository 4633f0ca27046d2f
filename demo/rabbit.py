"""The demo's own RabbitMQ objects: removed before a run, watched during it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import aio_pika
import aiormq

from .options import Names


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
