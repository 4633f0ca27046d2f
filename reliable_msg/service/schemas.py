"""Request and response bodies of the HTTP API (they make its OpenAPI schema)."""

from __future__ import annotations

import json
import math
import struct
from datetime import datetime
from typing import Annotated, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    field_validator,
)

from reliable_msg import constants
from reliable_msg.message import Delivery, HeaderValue, Message
from reliable_msg.policy import ID_RE, NAME_RE, TOPIC_RE
from reliable_msg.states import DeliveryStatus, MessageStatus

V = TypeVar("V")

#: What an AMQP field table holds as a signed 64-bit integer, the widest it has.
_INT64 = range(-(2**63), 2**63)
#: AMQP field-table names are short strings: at most 128 bytes.
MAX_HEADER_NAME_BYTES = 128


def storable(value: V) -> V:
    """Refuse, as bad input, what PostgreSQL or AMQP would fail on later: NUL characters
    and lone surrogates in strings, NaN and infinities, integers over 64 bits."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("NUL characters are not allowed")
        try:
            value.encode()
        except UnicodeEncodeError as exc:
            raise ValueError("strings must be valid Unicode: no lone surrogates") from exc
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError("NaN and infinities are not JSON")
    elif isinstance(value, dict):
        for k, v in value.items():
            storable(k)
            storable(v)
    elif isinstance(value, list):
        for v in value:
            storable(v)
    return value


def _not_dot_segment(id: str) -> str:
    """Refuse ``.`` and ``..``: every client and proxy that normalises a URL path (RFC 3986
    5.2.4) turns ``/v1/messages/../confirm`` into ``/v1/confirm``, so such a message
    could be prepared but never confirmed, cancelled or acked by its path."""
    if id in (".", ".."):
        raise ValueError("an id cannot be '.' or '..': URL paths drop them")
    return id


def _exact_in_32_bits(value: float) -> bool:
    """Whether AMQP carries ``value`` unchanged: a field table holds a float in 32 bits."""
    try:
        return bool(struct.unpack(">f", struct.pack(">f", value))[0] == value)
    except OverflowError:
        return False


MessageId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=constants.MAX_ID_LENGTH, pattern=ID_RE.pattern),
    AfterValidator(_not_dot_segment),
]
Topic = Annotated[
    str,
    StringConstraints(
        min_length=1, max_length=constants.MAX_TOPIC_LENGTH, pattern=TOPIC_RE.pattern
    ),
]
#: No limit in characters: the one rule is :data:`MAX_HEADER_NAME_BYTES` of UTF-8, which
#: ``MessageIn`` checks (a character limit would answer first, with another message).
HeaderName = Annotated[str, StringConstraints(min_length=1)]
GroupName = Annotated[str, StringConstraints(pattern=NAME_RE.pattern)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MessageIn(_In):
    id: MessageId | None = Field(default=None, description="Client-chosen id; generated if absent")
    topic: Topic
    payload: Annotated[JsonValue, AfterValidator(storable)] = Field(
        description="Any JSON value; sent as the AMQP body"
    )
    headers: Annotated[dict[HeaderName, HeaderValue], AfterValidator(storable)] = {}
    key: (
        Annotated[
            str,
            StringConstraints(max_length=constants.MAX_KEY_LENGTH),
            AfterValidator(storable),
        ]
        | None
    ) = None

    @field_validator("headers")
    @classmethod
    def _not_reserved(cls, headers: dict[str, HeaderValue]) -> dict[str, HeaderValue]:
        reserved = [h for h in headers if h.lower().startswith(constants.RESERVED_HEADER_PREFIX)]
        if reserved:
            raise ValueError(f"header names starting with x-rmsg- are reserved: {reserved}")
        too_long = [h for h in headers if len(h.encode()) > MAX_HEADER_NAME_BYTES]
        if too_long:
            raise ValueError(
                f"header names over {MAX_HEADER_NAME_BYTES} bytes cannot go on AMQP: {too_long}"
            )
        too_wide = [h for h, v in headers.items() if isinstance(v, int) and v not in _INT64]
        if too_wide:
            raise ValueError(f"header values over 64 bits cannot go on AMQP: {too_wide}")
        inexact = [
            h for h, v in headers.items() if isinstance(v, float) and not _exact_in_32_bits(v)
        ]
        if inexact:
            raise ValueError(
                "AMQP carries a header float as a 32-bit float, which would change these "
                f"values on the wire (send them as strings): {inexact}"
            )
        return headers


class PrepareBatchIn(_In):
    messages: list[MessageIn] = Field(min_length=1)


class IdsIn(_In):
    ids: list[MessageId] = Field(min_length=1)


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorOut(BaseModel):
    error: ErrorBody


class DeliveryOut(BaseModel):
    group: str
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    updated_at: datetime
    done_at: datetime | None

    @classmethod
    def of(cls, d: Delivery) -> DeliveryOut:
        return cls(
            group=d.group,
            status=d.status,
            attempts=d.attempts,
            next_attempt_at=d.next_attempt_at,
            last_error=d.last_error,
            updated_at=d.updated_at,
            done_at=d.done_at,
        )


class MessageOut(BaseModel):
    id: str
    topic: str
    producer: str
    status: MessageStatus
    payload: JsonValue
    headers: dict[str, HeaderValue]
    key: str | None
    groups: list[str]
    check_attempts: int
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None
    finished_at: datetime | None
    deliveries: list[DeliveryOut] | None = None

    @classmethod
    def of(cls, m: Message, *, deliveries: bool = False) -> MessageOut:
        return cls(
            id=m.id,
            topic=m.topic,
            producer=m.producer,
            status=m.status,
            payload=json.loads(m.payload),
            headers=m.headers,
            key=m.key,
            groups=list(m.groups),
            check_attempts=m.check_attempts,
            last_error=m.last_error,
            created_at=m.created_at,
            updated_at=m.updated_at,
            sent_at=m.sent_at,
            finished_at=m.finished_at,
            deliveries=[DeliveryOut.of(d) for d in m.deliveries] if deliveries else None,
        )


class AckOut(BaseModel):
    id: str
    group: str
    status: DeliveryStatus


class ItemOut(BaseModel):
    """One item of a batch: its status when it moved, or why it did not."""

    id: str
    ok: bool
    status: str | None = None
    created: bool | None = None
    error: ErrorBody | None = None
    #: Batch ack only, for a repeat: when the delivery became done (before this ack).
    done_at: datetime | None = None


class BatchOut(BaseModel):
    results: list[ItemOut]


class PageOut(BaseModel):
    messages: list[MessageOut]
    next_cursor: str | None


class RequeuedOut(BaseModel):
    requeued: int
    refused: list[str]


class HealthOut(BaseModel):
    status: str


class SwitchChangeOut(BaseModel):
    mode: str
    by: str | None = None
    at: float | None = None
    reason: str | None = None


class ReadyOut(BaseModel):
    status: str
    mode: str
    postgres: str
    rabbitmq: str
    redis: str
    #: Latest degradation switch changes, newest first (empty without the fallback).
    history: list[SwitchChangeOut] = []
    #: Entries waiting in each group's fallback shards; None when not known.
    fallback_depth: dict[str, int] | None = None
    #: Entries in each group's fallback dead stream; None when not known.
    fallback_dead: dict[str, int] | None = None
