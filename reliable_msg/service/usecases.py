"""The use-cases of the service: prepare, confirm, cancel, ack, read, requeue.

Routes and scanners call these; these call the store and the publisher through the ports.
Batch forms are the primitive: a single call is a batch of one. Each item of a batch
gets its own result, a :class:`Message` or the :class:`RequestError` /
:class:`BrokerError` that explains why it did not move.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from reliable_msg.errors import (
    TRANSIENT,
    BrokerError,
    BrokerUnavailable,
    Code,
    Conflict,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    ReliableMsgError,
    Unprocessable,
    Unpublishable,
    Unroutable,
)
from reliable_msg.message import Message, NewMessage, Publication, Transition
from reliable_msg.metrics import ACKS, CONFIRM_SECONDS, DEAD, TRANSITIONS
from reliable_msg.service.ports import Page, Publisher, Requeued, Store
from reliable_msg.service.publishing import in_batches
from reliable_msg.service.settings import Settings
from reliable_msg.states import D, DeliveryStatus, M, MessageStatus, died_from

log = logging.getLogger(__name__)

Result = Message | ReliableMsgError


@dataclass(frozen=True, slots=True)
class Prepared:
    message: Message
    created: bool


@dataclass(frozen=True, slots=True)
class Acked:
    id: str
    group: str
    #: When the delivery became done, if it already was before this ack (a repeat).
    done_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class BulkRequeued:
    requeued: int  #: messages with deliveries republished or check-back restarted
    refused: list[str]  #: messages with a delivery the broker refused: they stay ``dead``


class UseCases:
    """The use-cases of the reliable messages: what the HTTP API, the dashboard, the admin
    commands and the scanners ask for, over the store and publisher ports."""

    def __init__(self, settings: Settings, store: Store, publisher: Publisher) -> None:
        self._settings = settings
        self._store = store
        self._publisher = publisher
        self._publish = in_batches(publisher)

    # -- producer --------------------------------------------------------------------

    async def prepare(
        self, producer: str, items: Sequence[NewMessage]
    ) -> list[Prepared | ReliableMsgError]:
        """Store messages as ``pending``. A repeated id is the same request only when
        owner, topic, key, payload and headers are the same (canonical JSON, type-exact)."""
        results: dict[str, Prepared | ReliableMsgError] = {}
        valid: list[tuple[NewMessage, Sequence[str]]] = []
        for message in items:
            try:
                valid.append((message, self._subscribers(producer, message)))
            except ReliableMsgError as exc:
                results[message.id] = exc
        if valid:
            inserted, existing = await self._store.insert(
                producer, valid, self._settings.checkback.after
            )
            TRANSITIONS.labels(M.PENDING.value).inc(len(inserted))
            for m in inserted:
                results[m.id] = Prepared(m, created=True)
            for m, same in existing:
                results[m.id] = self._repeat(m, same)
        return [results[m.id] if m.id in results else _reused(m.id) for m in items]

    def _subscribers(self, producer: str, message: NewMessage) -> Sequence[str]:
        size = len(message.payload.encode())
        if size > self._settings.max_payload_bytes:
            raise PayloadTooLarge(
                f"payload is {size} bytes; the limit is {self._settings.max_payload_bytes}"
            )
        self._check_header(producer, message)
        groups = self._settings.subscribers_cached(message.topic)
        if not groups:
            raise Unprocessable(
                f"no consumer group subscribes to topic {message.topic!r}", code=Code.NO_SUBSCRIBER
            )
        return groups

    def _check_header(self, producer: str, message: NewMessage) -> None:
        """Refuse a message whose AMQP header would be over ``max_header_bytes``: one
        frame larger than RabbitMQ's ``frame_max`` costs every message the connection."""
        first = Publication(
            id=message.id,
            topic=message.topic,
            producer=producer,
            payload=message.payload,
            headers=message.headers,
            key=message.key,
            created_at=datetime.now(UTC),
            attempt=1,
        )
        try:
            size = self._publisher.header_bytes(first)
        except Unpublishable as exc:
            raise Unprocessable(exc.message, code=Code.UNENCODABLE) from exc
        limit = self._settings.max_header_bytes
        if size > limit:
            raise PayloadTooLarge(
                f"headers and properties take {size} bytes encoded for AMQP; the limit is "
                f"{limit} (max_header_bytes)",
                code=Code.HEADERS_TOO_LARGE,
            )

    @staticmethod
    def _repeat(existing: Message, same: bool) -> Prepared | ReliableMsgError:
        if same:
            return Prepared(existing, created=False)
        return Conflict(
            f"message {existing.id!r} already exists with another body", code=Code.ID_CONFLICT
        )

    async def confirm(self, producer: str | None, ids: Sequence[str]) -> list[Result]:
        """``pending`` → ``sent`` and published, or an error per id.

        ``producer=None`` is the service itself (check-back) and skips the owner check.
        """
        started = time.perf_counter()
        confirmed = await self._store.confirm(
            ids, producer, self._settings.redelivery.ack_timeout, self._publish
        )
        sent, refusals = confirmed.sent, confirmed.refused
        TRANSITIONS.labels(M.SENT.value).inc(len(sent))
        await self._count_refusals(refusals, checkback=producer is None)
        done: dict[str, Result] = {m.id: m for m in sent}
        rest = [i for i in ids if i not in done]
        if rest:
            for m in await self._store.get_many(rest):
                done[m.id] = self._explain_confirm(producer, m, refusals.get(m.id))
        caller = "checkback" if producer is None else "producer"
        CONFIRM_SECONDS.labels(caller).observe(time.perf_counter() - started)
        return [done.get(i) or _unknown(i) for i in ids]

    async def _count_refusals(self, refusals: dict[str, BrokerError], checkback: bool) -> None:
        """Count what the broker refused while up; a message refused ``max_refusals``
        times, or that can never be published, goes ``dead`` rather than being retried
        for ever (an outage, :class:`BrokerUnavailable`, is not counted).

        Only check-back's confirms count an unroutable refusal: they come once a lease,
        while a producer's SDK retries within seconds and would spend ``max_refusals``
        on one short topology gap; the message stays ``pending`` for check-back.
        """
        limits: dict[type[BrokerError], int] = {Unpublishable: 1}
        if checkback:
            limits[Unroutable] = self._settings.max_refusals
        counted = {
            id: (error.message, limits[type(error)])
            for id, error in refusals.items()
            if type(error) in limits
        }
        if not counted:
            return
        dead = await self._store.publish_refused(counted)
        TRANSITIONS.labels(M.DEAD.value).inc(len(dead))
        DEAD.labels("refused").inc(len(dead))
        for id in dead:
            log.error(
                "message %s is dead: the broker refused it (%s)",
                id,
                refusals[id].message,
                extra={"message_id": id},
            )

    @staticmethod
    def _explain_confirm(producer: str | None, m: Message, refusal: BrokerError | None) -> Result:
        if producer is not None and m.producer != producer:
            return _not_yours(m.id)
        if m.status is M.PENDING:
            return refusal or BrokerUnavailable("the broker did not take the message")
        if m.status is M.CANCELLED:
            return Conflict(f"message {m.id!r} was cancelled", code=Code.CANCELLED)
        if m.status is M.DEAD and died_from(m.sent_at) is M.PENDING:
            why = m.last_error if m.refusals else "check-back exhausted"
            return Conflict(
                f"message {m.id!r} is dead: {why}; an admin can requeue it", code=Code.DEAD
            )
        return m

    async def cancel(self, producer: str | None, ids: Sequence[str]) -> list[Result]:
        """``pending`` → ``cancelled``, or an error per id."""
        moved = set(await self._store.cancel(ids, producer))
        TRANSITIONS.labels(M.CANCELLED.value).inc(len(moved))
        found = {m.id: m for m in await self._store.get_many(ids)}
        return [self._explain_cancel(producer, i, found.get(i), i in moved) for i in ids]

    @staticmethod
    def _explain_cancel(producer: str | None, id: str, m: Message | None, moved: bool) -> Result:
        if m is None:
            return _unknown(id)
        if producer is not None and m.producer != producer:
            return _not_yours(id)
        if moved or m.status is M.CANCELLED:
            return m
        if m.status is M.DEAD and died_from(m.sent_at) is M.PENDING:
            return Conflict(f"message {id!r} is dead: check-back exhausted", code=Code.DEAD)
        return Conflict(f"message {id!r} was already sent", code=Code.ALREADY_SENT)

    # -- consumer --------------------------------------------------------------------

    async def ack(self, group: str, ids: Sequence[str]) -> list[Acked | ReliableMsgError]:
        """The group's delivery → ``done`` (idempotent), or an error per id."""
        unique = list(dict.fromkeys(ids))
        moved = set(await self._store.ack(group, unique))
        ACKS.labels(group).inc(len(moved))
        # An id named again (concurrent calls sharing one run, see GroupCommit) was moved
        # once: its later mentions are repeats, answered as a repeat ack would be.
        repeated = (
            {i for i, n in Counter(ids).items() if n > 1 and i in moved}
            if len(unique) < len(ids)
            else set()
        )
        rest = [i for i in unique if i not in moved or i in repeated]
        states = await self._store.delivery_states(group, rest) if rest else {}
        answers: list[Acked | ReliableMsgError] = []
        for i in ids:
            if i in moved:
                moved.discard(i)
                answers.append(Acked(i, group))
            else:
                answers.append(_explain_ack(group, i, states.get(i)))
        return answers

    # -- reads -----------------------------------------------------------------------

    async def get(self, id: str, producer: str | None) -> Message:
        """One message with its deliveries; a producer sees only its own."""
        m = await self._store.get(id)
        if m is None:
            raise _unknown(id)
        if producer is not None and m.producer != producer:
            raise _not_yours(id)
        return m

    async def page(
        self,
        *,
        status: MessageStatus | None,
        topic: str | None,
        group: str | None,
        limit: int,
        after: tuple[datetime, str] | None,
    ) -> Page:
        return await self._store.page(
            status=status, topic=topic, group=group, limit=limit, after=after
        )

    async def stats(self) -> dict[str, Any]:
        """Counts per status, per topic and per group."""
        return await self._store.stats()

    async def history(self, id: str) -> list[Transition]:
        """Every recorded move of message ``id`` and of its deliveries, oldest first."""
        return await self._store.history(id)

    # -- admin -----------------------------------------------------------------------

    async def requeue(self, id: str) -> Message:
        """Bring one ``dead`` message back (see :meth:`Store.requeue`); a delivery the
        broker refuses stays ``dead`` and is raised (the others it took are sent)."""
        done = await self._requeue_batch(ids=[id], topic=None, group=None, after=None)
        if id in done.refused:
            error = done.refused[id]
            raise type(error)(
                f"the broker refused a requeued delivery of {id!r} ({error.message}); it stays dead"
            )
        m = await self._store.get(id)
        if m is None:
            raise _unknown(id)
        if not done.selected:
            raise Conflict(f"message {id!r} is {m.status}, not dead", code=Code.NOT_DEAD)
        return m

    async def requeue_all(self, topic: str | None, group: str | None) -> BulkRequeued:
        """Requeue every ``dead`` message of a topic and/or group (only the group's dead
        deliveries). A delivery the broker refuses for good stays ``dead`` and is listed
        apart; a broker outage stops the call (what was taken before stays taken)."""
        total, refused, after = 0, list[str](), None
        while True:
            done = await self._requeue_batch(ids=None, topic=topic, group=group, after=after)
            total += len(done.resent) + len(done.rechecked)
            refused += done.refused
            outage = [e for e in done.refused.values() if isinstance(e, TRANSIENT)]
            if outage:
                raise BrokerUnavailable(
                    f"requeue stopped: {outage[0].message} ({total} messages requeued before)"
                )
            # Page on what was taken, not on what left ``dead``: another group's dead
            # delivery keeps a requeued message dead, and it still matches a topic. A
            # short page is not the end: a row waited for may have stopped matching.
            if not done.selected:
                return BulkRequeued(total, refused)
            after = done.selected[-1]

    async def purge(self, older_than: float) -> int:
        """Delete ``done`` and ``cancelled`` messages older than ``older_than`` seconds
        now; returns how many (their ids stay used)."""
        return await self._store.purge(older_than, batch=PURGE_BATCH)

    async def _requeue_batch(
        self,
        *,
        ids: Sequence[str] | None,
        topic: str | None,
        group: str | None,
        after: str | None,
    ) -> Requeued:
        done = await self._store.requeue(
            ids=ids,
            topic=topic,
            group=group,
            limit=self._settings.scanner.batch,
            after=after,
            ack_timeout=self._settings.redelivery.ack_timeout,
            publish=self._publish,
        )
        for id in done.resent:
            log.info("requeued message %s: deliveries republished", id, extra={"message_id": id})
        for id in done.rechecked:
            log.info("requeued message %s: check-back starts again", id, extra={"message_id": id})
        for id, error in done.refused.items():
            log.warning(
                "requeue of message %s: the broker refused a delivery (%s); it stays dead",
                id,
                error.message,
                extra={"message_id": id},
            )
        return done


#: Rows one statement of an operator's purge deletes.
PURGE_BATCH = 1000


def _unknown(id: str) -> NotFound:
    return NotFound(f"no message {id!r}")


def _reused(id: str) -> Conflict:
    return Conflict(
        f"message id {id!r} was used by a message that is now purged; an id is never reused",
        code=Code.ID_REUSED,
    )


def _not_yours(id: str) -> Forbidden:
    return Forbidden(f"message {id!r} belongs to another producer")


def _explain_ack(
    group: str, id: str, state: tuple[MessageStatus, DeliveryStatus | None, datetime | None] | None
) -> Acked | ReliableMsgError:
    if state is None:
        return _unknown(id)
    message_status, delivery_status, done_at = state
    if delivery_status is D.DONE:
        return Acked(id, group, done_at)
    if delivery_status is D.DEAD:
        return Conflict(
            f"delivery of {id!r} to {group!r} is dead; an admin can requeue it",
            code=Code.DELIVERY_DEAD,
        )
    if message_status is M.PENDING:
        return Conflict(f"message {id!r} is not confirmed yet", code=Code.NOT_SENT)
    if delivery_status is D.SENT:
        return Conflict(f"delivery of {id!r} is busy; ack again", code=Code.BUSY)
    return NotFound(f"message {id!r} has no delivery to group {group!r}")


def payload_text(payload: Any) -> str:
    """The JSON text of a payload as it goes on the wire: compact, UTF-8."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
