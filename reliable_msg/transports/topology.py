"""The RabbitMQ topology the service declares: the topic exchange, the dead-letter
exchange, the recovery probe's queue and, per group, its queue and dead-letter queue."""

from __future__ import annotations

import logging

import aio_pika
import aiormq
from aio_pika import ExchangeType

from reliable_msg.service.settings import Settings

log = logging.getLogger(__name__)


async def declare_topology(connection: aio_pika.abc.AbstractConnection, settings: Settings) -> None:
    """Declare the exchanges and, per group, its quorum queue and dead-letter queue."""
    async with connection.channel() as channel:
        exchange = await channel.declare_exchange(
            settings.exchange, ExchangeType.TOPIC, durable=True
        )
        dlx = await channel.declare_exchange(
            settings.dead_letter_exchange, ExchangeType.DIRECT, durable=True
        )
        await _declare_probe_queue(connection, settings)
        for name, group in settings.groups.items():
            queue = await channel.declare_queue(
                settings.queue_name(name),
                durable=True,
                arguments={
                    "x-queue-type": settings.queue_type,
                    "x-dead-letter-exchange": settings.dead_letter_exchange,
                    "x-dead-letter-routing-key": name,
                },
            )
            for pattern in group.topics:
                await queue.bind(exchange, pattern)
            dead = await channel.declare_queue(
                settings.dead_letter_queue(name),
                durable=True,
                arguments={"x-queue-type": settings.queue_type},
            )
            await dead.bind(dlx, name)


async def _declare_probe_queue(
    connection: aio_pika.abc.AbstractConnection, settings: Settings
) -> None:
    """The recovery probe's queue, on a channel of its own. A classic queue lives on one
    node of a cluster; while that node is down its declaration fails (NOT_FOUND) and,
    declared with the rest, failed the whole topology: an instance started then never
    connected. Now only the probe fails until that node is back."""
    try:
        async with connection.channel() as channel:
            await channel.declare_queue(
                settings.probe_queue,
                durable=True,
                arguments={"x-max-length": 10, "x-overflow": "drop-head"},
            )
    except aiormq.exceptions.ChannelNotFoundEntity as exc:
        log.warning("the probe queue is unavailable, the probe fails until it is back: %s", exc)
