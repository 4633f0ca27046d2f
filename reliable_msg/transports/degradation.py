"""The service's side of degradation (README: When RabbitMQ is down) as one object: the
RabbitMQ client, the Redis client, the shared switch, the fallback writer and the
publisher that chooses between them, started and stopped together; what readiness, stats
and the scanners' probe and report jobs ask of them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from reliable_msg.aio import stop_task
from reliable_msg.errors import BrokerError, FallbackUnavailable
from reliable_msg.metrics import FALLBACK_DEAD, FALLBACK_DEPTH
from reliable_msg.service.settings import Settings
from reliable_msg.transports.publisher import SwitchingPublisher
from reliable_msg.transports.rabbitmq import RabbitMQ
from reliable_msg.transports.redis import FallbackWriter, ping
from reliable_msg.transports.redis_client import redis_client
from reliable_msg.transports.switch import Mode, Switch

log = logging.getLogger(__name__)

#: How long a readiness probe waits for each dependency; also every Redis call's bound.
PROBE_TIMEOUT = 2.0
#: Switch changes shown by ``/readyz``, newest first.
READY_HISTORY = 5


class Degradation:
    """One service instance's transports. With the fallback disabled in the settings
    there is no switch and no fallback writer: the publisher is RabbitMQ alone."""

    def __init__(self, settings: Settings, *, who: str) -> None:
        self._settings = settings
        self._groups = list(settings.groups)
        fb = settings.fallback
        self.rabbitmq = RabbitMQ(settings)
        self.redis = redis_client(settings.redis_url, socket_timeout=PROBE_TIMEOUT)
        self.switch: Switch | None = None
        self.fallback: FallbackWriter | None = None
        if fb.enabled:
            self.switch = Switch(
                self.redis, who=who, namespace=fb.namespace, poll_interval=fb.poll_interval
            )
            self.fallback = FallbackWriter(
                self.redis,
                {name: settings.shards(name) for name in settings.groups},
                namespace=fb.namespace,
                default_shards=fb.shards,
                alarm=fb.shard_alarm,
            )
        self.publisher = SwitchingPublisher(
            self.rabbitmq, self.fallback, self.switch, failure_threshold=fb.failure_threshold
        )
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Read the switch, record the shard counts and follow the switch (Redis may be
        away: the switch is taken as normal until it answers); connect to RabbitMQ, now
        or in the background."""
        await self.read_switch(record_shards=True)
        if self.switch is not None:
            self._watch = asyncio.create_task(self.switch.watch())
        await self.rabbitmq.start()

    async def read_switch(self, *, record_shards: bool = False) -> None:
        """Read the switch once, and with ``record_shards`` write each group's shard
        count where consumers read it; with Redis away, log it and go on."""
        if self.switch is None:
            return
        try:
            await self.switch.refresh()
            if record_shards and self.fallback is not None:
                await self.fallback.record_shards()
        except FallbackUnavailable as exc:
            log.warning("Redis unreachable (%s); switch assumed normal", exc)

    async def stop(self) -> None:
        if self._watch is not None and self.switch is not None:
            self.switch.stop()
            await stop_task(self._watch, within=self._settings.fallback.poll_interval + 2)
        await self.rabbitmq.close()
        await self.redis.aclose()

    @property
    def mode(self) -> str:
        return self.switch.state.mode.value if self.switch is not None else Mode.NORMAL.value

    async def probe(self) -> bool:
        """The recovery probe: while degraded, publish to RabbitMQ's probe queue and clear
        the switch on success. True if this call cleared it."""
        if self.switch is None or not self.switch.degraded:
            return False
        try:
            async with asyncio.timeout(self.rabbitmq.publish_timeout):
                await self.rabbitmq.probe()
        except (BrokerError, TimeoutError) as exc:
            log.debug("probe failed: %s", exc)
            return False
        return await self.switch.clear("probe publish confirmed by RabbitMQ")

    async def ready(self) -> dict[str, Any]:
        """For ``/readyz``: the mode, RabbitMQ's and Redis's state (``ok`` or a short
        reason) and, with the fallback, the latest switch changes, each group's fallback
        depth and the length of its dead stream (None while Redis is away)."""
        report: dict[str, Any] = {
            "mode": self.mode,
            "rabbitmq": "ok" if self.rabbitmq.connected else "disconnected",
            "redis": await self._ping(),
            "history": [],
            "fallback_depth": None,
            "fallback_dead": None,
        }
        if self.switch is not None and report["redis"] == "ok":
            try:
                async with asyncio.timeout(PROBE_TIMEOUT):
                    report["history"] = await self.switch.history(READY_HISTORY)
                    report["fallback_depth"] = await self.depths()
                    report["fallback_dead"] = await self.dead()
            except (FallbackUnavailable, TimeoutError) as exc:
                log.debug("readiness: no switch history or depth (%s)", exc)
        return report

    async def _ping(self) -> str:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                await ping(self.redis)
        except (FallbackUnavailable, TimeoutError) as exc:
            return f"unavailable: {exc}"
        return "ok"

    async def depths(self) -> dict[str, int]:
        """Entries waiting in each group's shards; sets the depth gauges."""
        assert self.fallback is not None
        depths = {g: await self.fallback.depth(g) for g in self._groups}
        for group, depth in depths.items():
            FALLBACK_DEPTH.labels(group).set(depth)
        return depths

    async def dead(self) -> dict[str, int]:
        """Entries in each group's dead stream; sets the dead gauges."""
        assert self.fallback is not None
        dead = {g: await self.fallback.dead(g) for g in self._groups}
        for group, length in dead.items():
            FALLBACK_DEAD.labels(group).set(length)
        return dead

    async def report(self) -> dict[str, Any]:
        """Mode, switch history and fallback depth per group, for stats and dashboards."""
        report: dict[str, Any] = {
            "mode": self.mode,
            "connected": self.publisher.connected,
            "consecutive_failures": self.publisher.failures,
        }
        if self.switch is None or self.fallback is None:
            return report
        report["switch"] = self.switch.state.as_dict()
        try:
            report["history"] = await self.switch.history()
            report["fallback_depth"] = await self.depths()
            report["fallback_dead"] = await self.dead()
        except FallbackUnavailable as exc:
            report["fallback_error"] = str(exc)
        return report

    async def periodic_report(self) -> dict[str, Any]:
        """The scanners' report job: :meth:`report`, and a log line of the fallback depth
        per group while degraded or while any group has entries left."""
        report = await self.report()
        depths: dict[str, int] = report.get("fallback_depth") or {}
        degraded = report["mode"] == Mode.DEGRADED.value
        if degraded or any(depths.values()):
            log.log(
                logging.WARNING if degraded else logging.INFO,
                "mode %s; fallback depth per group: %s",
                report["mode"],
                ", ".join(f"{g}={d}" for g, d in depths.items()) or "unknown (Redis away)",
                extra={"fallback_depth": depths},
            )
        return report
