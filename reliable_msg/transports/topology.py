"""The RabbitMQ topology the service declares: the topic exchange, the dead-letter
exchange, the recovery probe's queue and, per group, its queue and dead-letter queue."""

from __future__ import annotations

import logging

import aio_pika
import aiormq
from aio_pika import ExchangeType
from pamqp.common import FieldTable

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
    """The recovery probe's queue, of ``queue_type`` like the groups' queues, on a
    channel of its own. A classic queue lives on one node of a cluster: with that node
    down the others neither declare it (the service could not connect) nor route to it
    (the probe could not clear the switch). One of another type, left by an older
    version, holds only probes: it is deleted and declared again. Should the declaration
    still fail (NOT_FOUND: an older classic one whose node is down), only the probe fails
    until that node is back."""
    arguments: FieldTable = {
        "x-max-length": 10,
        "x-overflow": "drop-head",
        "x-queue-type": settings.queue_type,
    }
    try:
        try:
            async with connection.channel() as channel:
                await channel.declare_queue(settings.probe_queue, durable=True, arguments=arguments)
            return
        except aio_pika.exceptions.ChannelPreconditionFailed as exc:
            log.warning("probe queue %s declared again: %s", settings.probe_queue, exc)
        async with connection.channel() as channel:
            await channel.queue_delete(settings.probe_queue)
            await channel.declare_queue(settings.probe_queue, durable=True, arguments=arguments)
    except aiormq.exceptions.ChannelNotFoundEntity as exc:
        log.warning("the probe queue is unavailable, the probe fails until it is back: %s", exc)
