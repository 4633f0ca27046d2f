"""The RabbitMQ adapter: publishing with publisher confirms; the topology it declares is
in :mod:`.topology`.

Every publish is persistent, ``mandatory`` (a message no queue takes is an error, not a
success) and bounded by ``publish_timeout``. The connection is robust: after a loss it
is re-established in the background and the topology declared again; with the nodes of a
cluster (``amqp_url`` a list), each attempt goes to the next node (:mod:`.failover`), and
a publish that finds the connection lost waits for it to come back on another node,
then tries once more (:meth:`RabbitMQ.publish`). A message whose
content header would not fit in one frame is never sent: RabbitMQ would close the whole
connection for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractRobustConnection,
    DeliveryMode,
)

from reliable_msg import constants
from reliable_msg.errors import BrokerError, BrokerUnavailable, Unpublishable, Unroutable
from reliable_msg.message import Publication
from reliable_msg.metrics import PUBLISH_REFUSALS, PUBLISH_SECONDS
from reliable_msg.service.settings import Settings
from reliable_msg.transports.failover import Cursor, connect_nodes
from reliable_msg.transports.nodes import where
from reliable_msg.transports.topology import declare_topology
from reliable_msg.transports.wire import UNENCODABLE, amqp_message, header_frame_bytes, unencodable

log = logging.getLogger(__name__)

#: What counts as a transient broker failure: the publish may succeed if tried later.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    ConnectionError,
    OSError,
    RuntimeError,
    TimeoutError,
)


#: Channels a service instance publishes on, in turn.
PUBLISH_CHANNELS = 4
#: Seconds between two attempts of the robust connection to reconnect.
RECONNECT_INTERVAL = 1.0
#: Least seconds between two declarations of the topology after unroutable publishes.
REDECLARE_INTERVAL = 5.0
#: Seconds between two looks at the connection while a publish waits for a failover.
FAILOVER_POLL = 0.05
#: Seconds a nacked publish waits before it tries again on a new channel, doubling
#: (several nodes only: :meth:`RabbitMQ._publish_renewing`).
NACK_PAUSE = 0.1

#: A publishing channel: the channel, the topic exchange and the default exchange on it.
Publishing = tuple[AbstractChannel, AbstractExchange, AbstractExchange]


class RabbitMQ:
    """Publishes messages to RabbitMQ and declares the topology they need."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._connection: AbstractRobustConnection | None = None
        #: Publishing channels, used in turn: a channel is one process in the broker, and
        #: one for every confirm serialises them there.
        self._channels: list[Publishing] = []
        self._turn = 0
        self._connecting: asyncio.Task[None] | None = None
        self._redeclaring: asyncio.Task[None] | None = None
        self._redeclared_at = -REDECLARE_INTERVAL
        self._nodes = Cursor(settings.amqp_urls)
        #: With several nodes, a publish waits for a lost connection to come back.
        self._failover = len(self._nodes.nodes) > 1
        #: When the connection was lost (monotonic), None while it is up.
        self._lost_at: float | None = None
        #: Bumped at each loss: a publish that saw it change lost its connection.
        self._losses = 0
        #: The transport given up after a publish timed out on it, and its closing.
        self._abandoning: tuple[object, asyncio.Task[None]] | None = None
        #: The new channel being opened for a publishing channel that nacked, by index.
        self._renewing: dict[int, asyncio.Task[None]] = {}

    @property
    def connected(self) -> bool:
        return (
            self._connection is not None
            and not self._connection.is_closed
            and bool(self._channels)
            and not any(channel.is_closed for channel, _, _ in self._channels)
        )

    async def start(self) -> None:
        """Connect now if RabbitMQ answers, else keep trying in the background."""
        try:
            await self._connect()
        except TRANSIENT_ERRORS as exc:
            log.warning("RabbitMQ not reachable at start-up (%s); retrying in background", exc)
            self._connecting = asyncio.create_task(self._connect_forever())

    async def _connect_forever(self) -> None:
        delay = 0.5
        while True:
            await asyncio.sleep(delay)
            try:
                await self._connect()
            except TRANSIENT_ERRORS as exc:
                delay = min(delay * 2, 10.0)
                log.debug("RabbitMQ still unreachable: %s", exc)
            else:
                log.info("connected to RabbitMQ")
                return

    async def _connect(self) -> None:
        connection = await connect_nodes(
            self._nodes,
            attempt_timeout=self._settings.publish_timeout,
            # Back within a second of RabbitMQ's return (aio-pika's default waits 5 s).
            reconnect_interval=RECONNECT_INTERVAL,
            client_properties={"connection_name": "reliable-msg"},
        )
        try:
            await declare_topology(connection, self._settings)
            channels: list[Publishing] = []
            for _ in range(PUBLISH_CHANNELS):
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                exchange = await channel.get_exchange(self._settings.exchange, ensure=False)
                channels.append((channel, exchange, channel.default_exchange))
        except BaseException:
            await connection.close()
            raise
        # An operator may have deleted queues while the connection was away.
        connection.reconnect_callbacks.add(lambda _: self._redeclare_soon(now=True))
        connection.reconnect_callbacks.add(self._on_reconnected)
        connection.close_callbacks.add(self._on_lost)
        self._connection, self._channels = connection, channels
        self._check_frame_max()

    def _on_lost(self, *_: object) -> None:
        if self._lost_at is None:
            self._lost_at = time.monotonic()
            self._losses += 1

    def _on_reconnected(self, *_: object) -> None:
        self._lost_at = None

    def expect_back(self) -> None:
        """RabbitMQ answers again (another instance's probe cleared the switch): while
        this instance still reconnects, a publish waits for it as right after a loss
        (:meth:`_failed_over`), rather than fail at once and trip the switch again."""
        if self._lost_at is not None:
            self._lost_at = time.monotonic()

    def _check_frame_max(self) -> None:
        """Say so when RabbitMQ's frame_max is below what ``max_header_bytes`` lets in:
        such messages are taken at prepare and go dead at confirm."""
        needed = self._settings.max_header_bytes + constants.HEADER_GROWTH
        if self._frame_max() < needed:
            log.error(
                "RabbitMQ's frame_max (%d) is below max_header_bytes (%d) plus %d: lower "
                "max_header_bytes, or messages with large headers will go dead at confirm",
                self._frame_max(),
                self._settings.max_header_bytes,
                constants.HEADER_GROWTH,
            )

    def _next_index(self) -> int:
        self._turn = (self._turn + 1) % len(self._channels)
        return self._turn

    def _redeclare_soon(self, *, now: bool = False) -> None:
        """Declare the topology again in the background: a queue an operator deleted
        makes every publish to it unroutable until it is back. After an unroutable
        publish, at most once every ``REDECLARE_INTERVAL`` seconds."""
        if self._redeclaring is not None and not self._redeclaring.done():
            return
        if not now and time.monotonic() - self._redeclared_at < REDECLARE_INTERVAL:
            return
        self._redeclared_at = time.monotonic()
        self._redeclaring = asyncio.create_task(self._redeclare(), name="declare topology")

    async def _redeclare(self) -> None:
        if self._connection is None:
            return
        try:
            await declare_topology(self._connection, self._settings)
        except TRANSIENT_ERRORS as exc:
            log.warning("could not declare the RabbitMQ topology again: %s", exc)
        else:
            log.info("RabbitMQ topology declared again")

    async def close(self) -> None:
        if self._redeclaring is not None:
            self._redeclaring.cancel()
        if self._connecting is not None:
            self._connecting.cancel()
        for renewing in self._renewing.values():
            renewing.cancel()
        if self._connection is not None:
            await self._connection.close()

    async def publish(self, out: Publication) -> None:
        """Publish one message and wait for the broker's confirm.

        Raises :class:`Unroutable` when no queue took it and :class:`BrokerUnavailable`
        on any other failure, a timeout included.

        With several nodes, a publish that finds the connection lost (at its start, or
        as its failure) waits for the reconnection to another node, at most until
        ``publish_timeout`` after the loss, then publishes once more on the new
        connection (a consumer's inbox drops the duplicate if the first one got
        through). It fails as before once that time is over, or if the second try fails.
        A node that lets a publish time out is left the same way (:meth:`_abandon`).
        With one node it never waits.

        How long it takes at most: ``publish_timeout`` with one node. With several,
        each try (:meth:`_publish_renewing`, its nacks and new channels included) ends
        within ``publish_timeout``, the wait for a failover ends ``publish_timeout``
        after the loss, and the loss comes within the first try or when its node is
        left (:meth:`_abandon`, up to aiormq's 2 s for a hung node's Close-Ok): three
        times ``publish_timeout``, plus those 2 s.
        """
        waited = False
        if not self.connected:
            if not await self._failed_over():
                raise BrokerUnavailable("not connected to RabbitMQ")
            waited = True
        losses = self._losses
        send, what = partial(self._publish, out), f"message {out.id}"
        try:
            await self._publish_renewing(send, what)
        except BrokerUnavailable as exc:
            if isinstance(exc.__cause__, TimeoutError) and not self._lost_since(losses):
                await self._abandon()
            if waited or not self._lost_since(losses) or not await self._failed_over():
                raise
            log.debug("message %s published again after a failover", out.id)
            await self._publish_renewing(send, what)

    async def _publish_renewing(
        self, send: Callable[[Publishing, float], Awaitable[None]], what: str
    ) -> None:
        """``send`` on the next publishing channel within ``publish_timeout`` (a publish:
        :meth:`_publish`, or the recovery probe: :meth:`_probe`); with several nodes, a
        nack replaces the channel that got it and ``send`` is tried again on the next,
        until ``publish_timeout``: no try, no new channel, goes on past it.

        A channel whose first publish to a quorum queue comes while the queue's leader
        is gone (its node just killed, no new leader elected yet: a fraction of a
        second) nacks every later publish to that queue, for as long as it lives
        (RabbitMQ 3.10; a channel opened then but used after the election works). The
        publishing channels restored on another node right after a failover are such
        channels: kept, they would trip the switch for the loss of one node, and, while
        it is tripped (no publish goes to RabbitMQ), fail every probe.
        """
        deadline = time.monotonic() + self._settings.publish_timeout
        pause = NACK_PAUSE
        while True:
            index = self._next_index()
            channel = self._channels[index][0]
            within = min(self._settings.publish_timeout, deadline - time.monotonic())
            try:
                await send(self._channels[index], within)
                return
            except BrokerUnavailable as exc:
                # Its subclass PublishError is a probe no queue took: no new channel helps.
                nacked = type(exc.__cause__) is aiormq.exceptions.DeliveryError
                renewed = self._channels[index][0] is not channel
                late = time.monotonic() + pause >= deadline
                if not self._failover or not (nacked or renewed) or late:
                    raise
                log.info("%s nacked: publishing it again on a new channel", what)
                await self._renew(index, channel, deadline)
                await asyncio.sleep(min(pause, deadline - time.monotonic()))
                if time.monotonic() >= deadline:
                    raise
            pause *= 2

    async def _renew(self, index: int, channel: AbstractChannel, deadline: float) -> None:
        """Put a new channel in place of publishing channel ``index`` unless that is no
        longer ``channel``; the publishes nacked on it together wait for one new channel
        (a batch through a failover opened one each), at most until ``deadline``."""
        if self._connection is None or self._channels[index][0] is not channel:
            return
        renewing = self._renewing.get(index)
        if renewing is None or renewing.done():
            renewing = asyncio.create_task(self._replace(index, channel), name="new channel")
            self._renewing[index] = renewing
        # Neither cancelled with this publish nor raising if close() cancels it.
        await asyncio.wait({renewing}, timeout=max(0.0, deadline - time.monotonic()))

    async def _replace(self, index: int, channel: AbstractChannel) -> None:
        """:meth:`_renew`'s work, within ``publish_timeout``: a node that nacks, then
        hangs, never opens the new channel."""
        assert self._connection is not None
        try:
            async with asyncio.timeout(self._settings.publish_timeout):
                fresh = await self._connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
                exchange = await fresh.get_exchange(self._settings.exchange, ensure=False)
        except TRANSIENT_ERRORS as exc:
            log.debug("no new channel: %r", exc)
            return
        if self._channels[index][0] is not channel:
            await fresh.close()
            return
        self._channels[index] = (fresh, exchange, fresh.default_exchange)
        with contextlib.suppress(*TRANSIENT_ERRORS):
            await channel.close()

    async def _abandon(self) -> None:
        """With several nodes, close the connection to the node that let a publish time
        out: a node that hangs without a reset (its machine gone, a partition) would be
        noticed by the heartbeats only minutes later, every publish timing out until the
        switch trips. The robust connection goes on to the next node. One closing per
        connection, whichever publishes time out on it."""
        transport = self._connection.transport if self._connection is not None else None
        if not self._failover or transport is None:
            return
        if self._abandoning is None or self._abandoning[0] is not transport:
            log.warning(
                "no publisher confirm from RabbitMQ at %s within %ss: leaving it for the next node",
                where(self._nodes.current or ""),
                self._settings.publish_timeout,
            )
            closing = transport.connection.close(ConnectionError("no publisher confirm in time"))
            self._abandoning = (transport, asyncio.create_task(closing))
        await asyncio.wait({self._abandoning[1]})  # not cancelled with this publish

    def _lost_since(self, losses: int) -> bool:
        return self._losses != losses or not self.connected

    async def _failed_over(self) -> bool:
        """With several nodes and a connection once made: wait until it is up again, at
        most ``publish_timeout`` after its loss; whether it is."""
        if not self._failover or self._connection is None:
            return False
        deadline = (self._lost_at or time.monotonic()) + self._settings.publish_timeout
        while not self.connected:
            if self._connection.is_closed or time.monotonic() >= deadline:
                return False
            await asyncio.sleep(FAILOVER_POLL)
        return True

    async def _publish(self, out: Publication, channel: Publishing, within: float) -> None:
        if not self.connected:
            raise BrokerUnavailable("not connected to RabbitMQ")
        _, topic_exchange, default = channel
        if out.group is None:
            exchange, routing_key = topic_exchange, out.topic
        else:
            exchange, routing_key = default, self._settings.queue_name(out.group)
        wire = amqp_message(out)
        self._fits_a_frame(out, wire)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(within):
                await exchange.publish(wire, routing_key, mandatory=True)
        except aiormq.exceptions.PublishError as exc:
            PUBLISH_REFUSALS.labels(Unroutable.code).inc()
            self._redeclare_soon()
            raise Unroutable(f"no queue is bound for {routing_key!r}") from exc
        except UNENCODABLE as exc:
            raise unencodable(out, exc) from exc
        except aiormq.exceptions.DeliveryError as exc:
            raise BrokerUnavailable(f"broker refused the message: {exc}") from exc
        except TimeoutError as exc:
            raise BrokerUnavailable(
                f"no publisher confirm within {self._settings.publish_timeout}s"
            ) from exc
        except TRANSIENT_ERRORS as exc:
            raise BrokerUnavailable(f"publish failed: {exc!r}") from exc
        PUBLISH_SECONDS.observe(time.perf_counter() - started)

    def _fits_a_frame(self, out: Publication, wire: aio_pika.Message) -> None:
        """Raise :class:`Unpublishable` for a message RabbitMQ could never take."""
        try:
            size = header_frame_bytes(wire)
        except UNENCODABLE as exc:
            raise unencodable(out, exc) from exc
        frame_max = self._frame_max()
        if size > frame_max:
            PUBLISH_REFUSALS.labels(Unpublishable.code).inc()
            raise Unpublishable(
                f"message {out.id} can never be published: its AMQP header takes {size} "
                f"bytes, over RabbitMQ's frame_max of {frame_max}"
            )

    @staticmethod
    def header_bytes(out: Publication) -> int:
        """The size of the content header frame ``out`` makes; :class:`Unpublishable`
        for a value AMQP cannot carry."""
        try:
            return header_frame_bytes(amqp_message(out))
        except UNENCODABLE as exc:
            raise Unpublishable(f"message {out.id} cannot be encoded for AMQP: {exc!r}") from exc

    def _frame_max(self) -> int:
        """The ``frame_max`` RabbitMQ gave this connection."""
        transport = self._connection.transport if self._connection is not None else None
        if transport is None:
            return constants.AMQP_FRAME_MAX
        return int(transport.connection.connection_tune.frame_max)

    @property
    def publish_timeout(self) -> float:
        return self._settings.publish_timeout

    async def probe(self) -> None:
        """Publish a confirmed probe message to the probe queue; raise if not taken. With
        several nodes, a nack renews the channel as for a publish (:meth:`_publish_renewing`):
        while the switch is tripped, the probe is all that renews them."""
        if not self.connected:
            raise BrokerUnavailable("not connected to RabbitMQ")
        await self._publish_renewing(self._probe, "probe")

    async def _probe(self, channel: Publishing, within: float) -> None:
        message = aio_pika.Message(b"probe", delivery_mode=DeliveryMode.PERSISTENT)
        try:
            async with asyncio.timeout(within):
                await channel[2].publish(message, self._settings.probe_queue, mandatory=True)
        except TRANSIENT_ERRORS as exc:
            raise BrokerUnavailable(f"probe failed: {exc!r}") from exc

    async def publish_many(self, outs: list[Publication]) -> dict[str, BrokerError]:
        """Publish concurrently; return the ids not taken, with the error."""
        results = await asyncio.gather(*(self.publish(o) for o in outs), return_exceptions=True)
        refused: dict[str, BrokerError] = {}
        for out, result in zip(outs, results, strict=True):
            if isinstance(result, BrokerError):
                refused[out.id] = result
            elif isinstance(result, BaseException):
                raise result
        return refused
