"""The consumer's RabbitMQ source: its attachment to the group's queue
(:class:`QueueReader`), and each delivery as a :class:`~.source.Source`.

Given the nodes of a cluster, the reader attaches through the first, and after a failed
attach or a lost connection through the next one in turn."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from reliable_msg import constants
from reliable_msg.aio import first_of
from reliable_msg.transports.nodes import where
from reliable_msg.transports.switch import Mode

from ._log import log
from .message import Poison, Received

if TYPE_CHECKING:
    from .consumer import Consumer


class QueueReader:
    """A consumer's attachment to its group's RabbitMQ queue: it hands each delivery to
    :meth:`Consumer.consume <.consumer.Consumer.consume>`."""

    def __init__(self, consumer: Consumer, nodes: Sequence[str], prefetch: int) -> None:
        self._consumer = consumer
        self._nodes = tuple(nodes)
        self._turn = 0  #: index in ``_nodes`` of the node of the next attach
        self._prefetch = prefetch
        self._in_flight: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Stay attached to the queue until the consumer stops; after a loss while
        degraded, wait for normal mode. Returns once the deliveries in hand are settled."""
        consumer = self._consumer
        delay = 0.2
        while not consumer.stopping:
            if consumer.mode is Mode.DEGRADED and not await consumer.wait_normal():
                break
            node = self._nodes[self._turn % len(self._nodes)]
            try:
                await self._attach(node)
                delay = 0.2
            except (OSError, aio_pika.exceptions.AMQPError, RuntimeError) as exc:
                log.warning(
                    "consumer %s: RabbitMQ unavailable at %s (%s)", consumer.group, where(node), exc
                )
            if not consumer.stopping:
                self._turn += 1  # a failure or a loss: the next node
                await consumer.sleep(delay)
                delay = min(delay * 2, 5.0)
        await self._settled()

    async def _settled(self) -> None:
        if self._in_flight:
            await asyncio.wait(set(self._in_flight))

    async def _attach(self, node: str) -> None:
        consumer = self._consumer
        connecting = asyncio.ensure_future(aio_pika.connect(node, timeout=10))
        await first_of(asyncio.shield(connecting), consumer.wait_stopping())
        if not connecting.done():  # asked to stop while connecting
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
            return
        connection = connecting.result()
        lost = asyncio.Event()
        connection.close_callbacks.add(lambda *_: lost.set())
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=self._prefetch)
            queue = await channel.get_queue(consumer.queue, ensure=True)
            tag = await queue.consume(self._on_message)
            log.info("consumer %s: consuming %s at %s", consumer.group, consumer.queue, where(node))
            await first_of(consumer.wait_stopping(), lost.wait())
            if not lost.is_set():
                await queue.cancel(tag)
                # Ack on this channel before it closes whatever was handled, in flight or
                # waiting in the batcher: RabbitMQ would deliver it again otherwise.
                await self._settled()
                await consumer.flush_acks()
        finally:
            await connection.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        try:
            await self._consumer.consume(received(message), AmqpSource(message))
        finally:
            self._in_flight.discard(task)


class AmqpSource:
    """A RabbitMQ delivery, settled on the channel that brought it."""

    def __init__(self, message: AbstractIncomingMessage) -> None:
        self.message = message

    @property
    def where(self) -> str:
        return f"RabbitMQ delivery {self.message.delivery_tag}"

    async def ack(self) -> None:
        await self.message.ack()

    async def retry(self) -> None:
        # The service, not RabbitMQ, redelivers it: a requeue here would skip its backoff.
        await self.message.ack()

    async def reject(self, reason: str) -> None:
        await self.message.reject(requeue=False)  # dead-lettered to the group's .dlq


def received(message: AbstractIncomingMessage) -> Received | Poison:
    """The delivery as a handler sees it, or the :class:`Poison` no handler can take."""
    if not message.message_id:
        return Poison("no message_id")
    try:
        payload = json.loads(message.body)
    except ValueError as exc:
        return Poison(f"body is not JSON: {exc}", id=message.message_id)
    headers = dict(message.headers or {})
    attempt = headers.pop(constants.HEADER_ATTEMPT, 1)
    producer = headers.pop(constants.HEADER_PRODUCER, None)
    key = headers.pop(constants.HEADER_KEY, None)
    return Received(
        id=message.message_id,
        topic=message.type or "",
        payload=payload,
        headers=headers,
        key=str(key) if key is not None else None,
        attempt=int(attempt) if isinstance(attempt, int) else 1,
        producer=str(producer) if producer is not None else None,
    )
