"""The wire form of a message on RabbitMQ (README: Wire format on RabbitMQ), and what
AMQP cannot carry."""

from __future__ import annotations

import struct
from typing import Any

import aio_pika
from aio_pika.abc import DeliveryMode
from pamqp import frame
from pamqp.header import ContentHeader

from reliable_msg import constants
from reliable_msg.errors import Unpublishable
from reliable_msg.message import Publication
from reliable_msg.metrics import PUBLISH_REFUSALS

#: What the AMQP encoder raises for a value it cannot put on the wire: never transient.
UNENCODABLE: tuple[type[BaseException], ...] = (ValueError, TypeError, OverflowError, struct.error)


def amqp_message(out: Publication) -> aio_pika.Message:
    """The wire form (README: Wire format on RabbitMQ): a plain AMQP client can read it
    without our SDK."""
    headers: dict[str, Any] = dict(out.headers)
    headers[constants.HEADER_ATTEMPT] = out.attempt
    headers[constants.HEADER_PRODUCER] = out.producer
    if out.key is not None:
        headers[constants.HEADER_KEY] = out.key
    return aio_pika.Message(
        body=out.payload.encode(),
        message_id=out.id,
        type=out.topic,
        content_type="application/json",
        delivery_mode=DeliveryMode.PERSISTENT,
        timestamp=out.created_at,
        headers=headers,
    )


def header_frame_bytes(wire: aio_pika.Message) -> int:
    """The size of the content header frame (properties and headers) ``wire`` makes;
    RabbitMQ closes the connection on a frame larger than its ``frame_max``.

    Raises one of :data:`UNENCODABLE` for a value AMQP cannot carry.
    """
    return len(frame.marshal(ContentHeader(0, len(wire.body), wire.properties), 1))


def unencodable(out: Publication, exc: BaseException) -> Unpublishable:
    PUBLISH_REFUSALS.labels(Unpublishable.code).inc()
    return Unpublishable(f"message {out.id} cannot be encoded for AMQP: {exc!r}")
