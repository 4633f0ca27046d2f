"""The narrow interfaces the use-cases need; adapters in store.py and transports/."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from reliable_msg.errors import BrokerError
from reliable_msg.message import DeliveryUpdate, DueCheck, Message, NewMessage, Outgoing
from reliable_msg.states import DeliveryStatus, MessageStatus

if TYPE_CHECKING:
    from reliable_msg.service.store import Page, PublishMany, Requeued


class Publisher(Protocol):
    @property
    def connected(self) -> bool: ...

    async def publish(self, out: Outgoing) -> None:
        """Publish one message, confirmed; raise :class:`BrokerError` if not taken."""

    async def publish_many(self, outs: list[Outgoing]) -> dict[str, BrokerError]:
        """Publish messages; return the ids not taken, with the error."""

    def header_bytes(self, out: Outgoing) -> int:
        """The size of the AMQP content header ``out`` makes; raise
        :class:`~reliable_msg.errors.Unpublishable` for a value AMQP cannot carry."""


class Store(Protocol):
    async def insert(
        self, producer: str, items: Sequence[tuple[NewMessage, Sequence[str]]], check_in: float
    ) -> tuple[list[Message], list[tuple[Message, bool]]]: ...

    async def confirm(
        self, ids: Sequence[str], producer: str | None, ack_timeout: float, publish: PublishMany
    ) -> list[Message]: ...

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

    async def claim_checks(
        self, limit: int, lease: float, skip: Sequence[str] = ()
    ) -> list[DueCheck]: ...

    async def release_checks(self, ids: Sequence[str]) -> None: ...

    async def check_failed(self, check: DueCheck, error: str, retry_in: float | None) -> bool: ...

    async def redeliver(
        self, limit: int, decide: Callable[[list[Outgoing]], Awaitable[list[DeliveryUpdate]]]
    ) -> int: ...

    async def requeue(
        self,
        *,
        ids: Sequence[str] | None,
        topic: str | None,
        group: str | None,
        limit: int,
        after: str | None = None,
        ack_timeout: float,
        publish: PublishMany,
    ) -> Requeued: ...

    async def purge(self, older_than: float, batch: int) -> int: ...

    async def forget_ids(self, older_than: float, batch: int) -> int: ...
