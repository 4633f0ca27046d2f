"""Messages and deliveries as the core sees them, independent of any adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from reliable_msg.states import DeliveryStatus, MessageStatus

#: Values a message header may hold (AMQP field-table friendly).
HeaderValue = str | int | float | bool


@dataclass(frozen=True, slots=True)
class NewMessage:
    """What a producer asks to prepare. ``payload`` is the JSON text sent on the wire."""

    id: str
    topic: str
    payload: str
    headers: dict[str, HeaderValue] = field(default_factory=dict)
    key: str | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    """One (message, consumer group) pair, tracked on its own."""

    group: str
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    updated_at: datetime
    done_at: datetime | None


@dataclass(frozen=True, slots=True)
class Message:
    id: str
    topic: str
    producer: str
    payload: str
    headers: dict[str, HeaderValue]
    key: str | None
    status: MessageStatus
    groups: tuple[str, ...]
    check_attempts: int
    next_check_at: datetime | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None
    finished_at: datetime | None
    #: publishes the broker refused (while up) since the message was prepared or requeued
    refusals: int = 0
    deliveries: tuple[Delivery, ...] = ()


@dataclass(frozen=True, slots=True)
class Publication:
    """A message on its way to the broker, for all subscribed groups or for one."""

    id: str
    topic: str
    producer: str
    payload: str
    headers: dict[str, HeaderValue]
    key: str | None
    created_at: datetime
    attempt: int
    #: The one group of a redelivery; None for the first publish, to every group.
    group: str | None = None
    #: The groups subscribed at prepare time (where a fallback write goes).
    groups: tuple[str, ...] = ()
    #: Redeliveries in a row the broker refused (a redelivery only).
    refusals: int = 0

    @classmethod
    def first(cls, message: Message) -> Publication:
        """The first publish of a confirmed message, to the topic exchange."""
        return cls(
            id=message.id,
            topic=message.topic,
            producer=message.producer,
            payload=message.payload,
            headers=message.headers,
            key=message.key,
            created_at=message.created_at,
            attempt=1,
            groups=message.groups,
        )

    def targets(self) -> tuple[str, ...]:
        """The groups this publish is for."""
        return (self.group,) if self.group is not None else self.groups


@dataclass(frozen=True, slots=True)
class DueCheck:
    """A pending message whose producer must be asked whether it committed."""

    id: str
    topic: str
    producer: str
    created_at: datetime
    check_attempts: int


@dataclass(frozen=True, slots=True)
class DeliveryUpdate:
    """What a redelivery pass decided for one delivery."""

    message_id: str
    group: str
    status: DeliveryStatus
    attempts: int
    next_in: float
    last_error: str | None = None
    #: redeliveries in a row the broker refused; a taken one starts the count again
    refusals: int = 0


@dataclass(frozen=True, slots=True)
class Transition:
    """One recorded move of a message (``group_name`` None) or of one of its deliveries."""

    group_name: str | None
    #: None for the prepare that created the message.
    from_status: str | None
    to_status: str
    at: datetime
    reason: str | None
