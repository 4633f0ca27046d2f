"""The narrow interfaces the use-cases need, and the values that cross them.

The adapters implement them: :mod:`reliable_msg.service.store` (PostgreSQL) the
:class:`Store`, :mod:`reliable_msg.transports` (RabbitMQ, and the Redis fallback behind
the switch) the :class:`Publisher`. The dependency points inward: nothing here imports
an adapter.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from reliable_msg.errors import BrokerError
from reliable_msg.message import (
    DeliveryUpdate,
    DueCheck,
    Message,
    NewMessage,
    Publication,
    Transition,
)
from reliable_msg.states import DeliveryStatus, MessageStatus

Publish = Callable[[Sequence[Publication]], Awaitable[list[BrokerError | None]]]
"""Publishes a batch and answers for each message, in order: None when taken, else why
not. The one shape in which the store is handed a publish (confirm, redelivery,
requeue); :mod:`reliable_msg.service.publishing` makes it from a :class:`Publisher`."""


@dataclass(frozen=True, slots=True)
class Page:
    """One page of messages, oldest first, and where the next one starts."""

    messages: list[Message]
    next_cursor: tuple[datetime, str] | None


@dataclass(frozen=True, slots=True)
class Confirmed:
    """What one confirm did."""

    sent: list[Message]  #: the messages now ``sent``
    refused: dict[str, BrokerError]  #: those the broker did not take (still ``pending``)


@dataclass(frozen=True, slots=True)
class Requeued:
    """What one requeue call did."""

    selected: list[str]  #: the dead messages it took, in id order
    resent: list[str]  #: of them, those with dead deliveries republished (or now ``sent``)
    rechecked: list[str]  #: of them, those back to ``pending`` for check-back
    #: of them, those with a delivery the broker refused (it stays ``dead``), and why
    refused: dict[str, BrokerError] = field(default_factory=dict)


class Redelivery(Protocol):
    """What a redelivery pass decides for each due delivery, inside the store's claim."""

    def exhausted(self, out: Publication) -> DeliveryUpdate | None:
        """The update of a delivery out of attempts (not published again), else None."""

    def published(self, out: Publication, error: BrokerError | None) -> DeliveryUpdate:
        """The update of a delivery republished (``error`` None) or not taken."""


class Publisher(Protocol):
    @property
    def connected(self) -> bool: ...

    async def publish(self, out: Publication) -> None:
        """Publish one message, confirmed; raise :class:`BrokerError` if not taken."""

    async def publish_many(self, outs: list[Publication]) -> dict[str, BrokerError]:
        """Publish messages; return the ids not taken, with the error."""

    def header_bytes(self, out: Publication) -> int:
        """The size of the AMQP content header ``out`` makes; raise
        :class:`~reliable_msg.errors.Unpublishable` for a value AMQP cannot carry."""


class Store(Protocol):
    async def ping(self) -> None: ...

    async def insert(
        self, producer: str, items: Sequence[tuple[NewMessage, Sequence[str]]], check_in: float
    ) -> tuple[list[Message], list[tuple[Message, bool]]]: ...

    async def confirm(
        self, ids: Sequence[str], producer: str | None, ack_timeout: float, publish: Publish
    ) -> Confirmed: ...

    async def publish_refused(self, refused: Mapping[str, tuple[str, int]]) -> list[str]: ...

    async def cancel(self, ids: Sequence[str], producer: str | None) -> list[str]: ...

    async def ack(self, group: str, ids: Sequence[str]) -> list[str]: ...

    async def delivery_states(
        self, group: str, ids: Sequence[str]
    ) -> dict[str, tuple[MessageStatus, DeliveryStatus | None, datetime | None]]: ...

    async def get(self, id: str) -> Message | None: ...

    async def get_many(self, ids: Sequence[str]) -> list[Message]: ...

    async def page(
        self,
        *,
        status: MessageStatus | None,
        topic: str | None,
        group: str | None,
        limit: int,
        after: tuple[datetime, str] | None,
    ) -> Page: ...

    async def stats(self) -> dict[str, Any]: ...

    async def history(self, id: str) -> list[Transition]: ...

    async def scanner_lag(self) -> dict[str, float]: ...

    async def claim_checks(
        self, limit: int, lease: float, skip: Sequence[str] = ()
    ) -> list[DueCheck]: ...

    async def release_checks(self, ids: Sequence[str]) -> None: ...

    async def check_failed(self, check: DueCheck, error: str, retry_in: float | None) -> bool: ...

    async def redeliver(self, limit: int, publish: Publish, decide: Redelivery) -> int: ...

    async def requeue(
        self,
        *,
        ids: Sequence[str] | None,
        topic: str | None,
        group: str | None,
        limit: int,
        after: str | None = None,
        ack_timeout: float,
        publish: Publish,
    ) -> Requeued: ...

    async def purge(self, older_than: float, batch: int) -> int: ...

    async def forget_ids(self, older_than: float, batch: int) -> int: ...
