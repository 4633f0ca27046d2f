"""The publisher the use-cases talk to: RabbitMQ normally, the Redis fallback while the
degradation switch is on (README: When RabbitMQ is down).

It counts consecutive failed publishes (timeouts included); at ``failure_threshold`` it
trips the shared switch and writes the failed message to the fallback at once, so the
caller still gets its answer (clearing the switch is the recovery probe's, in
:mod:`reliable_msg.transports.degradation`). The count starts again at every
successful publish and at every change of the switch, whoever flipped it: an instance
that counted failures before another one tripped the switch must not trip it again at
its first failure after recovery.
"""

from __future__ import annotations

import logging

from reliable_msg.errors import BrokerError, BrokerUnavailable, FallbackUnavailable
from reliable_msg.message import Publication
from reliable_msg.transports.rabbitmq import RabbitMQ
from reliable_msg.transports.redis import FallbackWriter
from reliable_msg.transports.switch import Mode, Switch, SwitchState

log = logging.getLogger(__name__)


class SwitchingPublisher:
    def __init__(
        self,
        rabbitmq: RabbitMQ,
        fallback: FallbackWriter | None,
        switch: Switch | None,
        *,
        failure_threshold: int,
    ) -> None:
        self.rabbitmq = rabbitmq
        self._fallback = fallback
        self._switch = switch
        self._threshold = failure_threshold
        self.failures = 0  #: consecutive failed publishes to RabbitMQ
        if switch is not None:
            switch.on_change(self._switch_changed)

    def _switch_changed(self, state: SwitchState) -> None:
        self.failures = 0
        if state.mode is Mode.NORMAL:
            self.rabbitmq.expect_back()

    @property
    def connected(self) -> bool:
        return self.rabbitmq.connected

    @property
    def degraded(self) -> bool:
        return self._switch is not None and self._switch.degraded

    def header_bytes(self, out: Publication) -> int:
        return self.rabbitmq.header_bytes(out)

    async def publish(self, out: Publication) -> None:
        refused = await self.publish_many([out])
        if refused:
            raise refused[out.id]

    async def publish_many(self, outs: list[Publication]) -> dict[str, BrokerError]:
        """Publish each message; return the ids not taken, with the error."""
        if self.degraded:
            return await self._to_fallback(outs)
        refused = await self.rabbitmq.publish_many(outs)
        self._count(len(outs) - len(refused), refused)
        if refused and await self._maybe_trip(refused):
            # Only the outage's failures go to Redis: a refusal keeps its error, so it is
            # counted and ends dead rather than travel a path that hides it.
            down = [o for o in outs if isinstance(refused.get(o.id), BrokerUnavailable)]
            kept = {id: e for id, e in refused.items() if not isinstance(e, BrokerUnavailable)}
            return kept | await self._to_fallback(down)
        return refused

    def _count(self, taken: int, refused: dict[str, BrokerError]) -> None:
        if taken:
            self.failures = 0
        # Unroutable is a topology problem, not an outage: it never trips the switch.
        self.failures += sum(1 for e in refused.values() if isinstance(e, BrokerUnavailable))

    async def _maybe_trip(self, refused: dict[str, BrokerError]) -> bool:
        if self._switch is None or self.failures < self._threshold:
            return False
        reason = (
            f"{self.failures} consecutive failed publishes; last: {next(iter(refused.values()))}"
        )
        try:
            await self._switch.trip(reason)
        except FallbackUnavailable as exc:  # Redis down too: stay in normal mode, say so
            log.error("could not trip the degradation switch: %s", exc)
            return False
        return True

    async def _to_fallback(self, outs: list[Publication]) -> dict[str, BrokerError]:
        if self._fallback is None:
            error = BrokerUnavailable("degraded, and no fallback is configured")
            return {o.id: error for o in outs}
        try:
            await self._fallback.write(outs)
        except FallbackUnavailable as exc:
            # Not published, and the reason is RabbitMQ's outage (the switch says so):
            # an outage refusal like any other, with the Redis failure as its cause.
            error = BrokerUnavailable(f"RabbitMQ is down and so is the Redis fallback: {exc}")
            error.__cause__ = exc
            return {o.id: error for o in outs}
        return {}
