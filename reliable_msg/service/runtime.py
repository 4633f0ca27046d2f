"""Wiring: one object that owns the connections, the use-cases and the scanners of an
instance, started and stopped as a whole."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

import redis.asyncio as aioredis

from reliable_msg.aio import stop_task
from reliable_msg.errors import FallbackUnavailable, ReliableMsgError
from reliable_msg.metrics import FALLBACK_DEAD, FALLBACK_DEPTH
from reliable_msg.service.auth import Authenticator
from reliable_msg.service.checkback import CheckBackClient
from reliable_msg.service.monitor import Monitor
from reliable_msg.service.scanners import CheckBackScanner, Purger, RedeliveryScanner, Scanners
from reliable_msg.service.settings import Settings
from reliable_msg.service.store import PgStore
from reliable_msg.service.usecases import MessageService
from reliable_msg.transports.publisher import SwitchingPublisher
from reliable_msg.transports.rabbitmq import RabbitMQ
from reliable_msg.transports.redis import FallbackWriter, ping
from reliable_msg.transports.switch import Mode, Switch

log = logging.getLogger(__name__)


def instance_name() -> str:
    """Who flips the switch, in its history: host and process."""
    return f"{socket.gethostname()}:{os.getpid()}"


#: How long a readiness probe waits for each dependency.
PROBE_TIMEOUT = 2.0
#: Switch changes shown by ``/readyz``, newest first.
READY_HISTORY = 5


class Runtime:
    """Everything one service instance runs. Build with :meth:`create`."""

    def __init__(
        self,
        settings: Settings,
        store: PgStore,
        rabbit: RabbitMQ,
        checkback: CheckBackClient,
        redis: aioredis.Redis,
        *,
        scanners: bool,
    ) -> None:
        self.settings = settings
        self.store = store
        self.redis = redis
        self.auth = Authenticator(settings)
        fb = settings.fallback
        self.switch = (
            Switch(
                redis, who=instance_name(), namespace=fb.namespace, poll_interval=fb.poll_interval
            )
            if fb.enabled
            else None
        )
        self.fallback = (
            FallbackWriter(
                redis,
                {name: settings.shards(name) for name in settings.groups},
                namespace=fb.namespace,
                default_shards=fb.shards,
                alarm=fb.shard_alarm,
            )
            if fb.enabled
            else None
        )
        self.publisher = SwitchingPublisher(
            rabbit, self.fallback, self.switch, failure_threshold=fb.failure_threshold
        )
        self.service = MessageService(settings, store, self.publisher)
        self.checkback_client = checkback
        self.checkback = CheckBackScanner(settings, store, self.service, checkback)
        self.redelivery = RedeliveryScanner(settings, store, self.publisher)
        self.purger = Purger(settings, store)
        self.monitor = Monitor(settings, store)
        self.scanners = (
            Scanners(
                settings,
                self.checkback,
                self.redelivery,
                self.purger,
                self.publisher,
                self.periodic_report,
            )
            if scanners
            else None
        )
        self._watch: asyncio.Task[None] | None = None

    @classmethod
    async def create(
        cls, settings: Settings, *, scanners: bool | None = None, wait_for_store: float = 0.0
    ) -> Runtime:
        """Connect to PostgreSQL (must answer, within ``wait_for_store`` seconds) and
        RabbitMQ (may come later)."""
        store = await PgStore.connect(
            settings.database_url, pool_size=settings.db_pool_size, wait=wait_for_store
        )
        rabbit = RabbitMQ(settings)
        client = CheckBackClient(settings.checkback)
        redis = aioredis.Redis.from_url(settings.redis_url, socket_timeout=PROBE_TIMEOUT)
        run_scanners = settings.scanner.enabled if scanners is None else scanners
        return cls(settings, store, rabbit, client, redis, scanners=run_scanners)

    async def start(self) -> None:
        if self.switch is not None:
            try:
                await self.switch.refresh()
                if self.fallback is not None:
                    await self.fallback.record_shards()
            except FallbackUnavailable as exc:
                log.warning("Redis unreachable at start-up (%s); switch assumed normal", exc)
            self._watch = asyncio.create_task(self.switch.watch())
        await self.publisher.rabbitmq.start()
        await self.checkback_client.start()
        if self.scanners is not None:
            self.scanners.start()
        self.monitor.start()

    async def stop(self) -> None:
        await self.monitor.stop()
        if self.scanners is not None:
            await self.scanners.stop()
        else:  # passes run by hand (tests, tools) may have left calls in flight
            await self.checkback.stop()
        if self._watch is not None and self.switch is not None:
            self.switch.stop()
            await stop_task(self._watch, within=self.settings.fallback.poll_interval + 2)
        await self.checkback_client.close()
        await self.publisher.rabbitmq.close()
        await self.redis.aclose()
        await self.store.close()

    async def readiness(self) -> dict[str, Any]:
        """Each dependency's state, as ``ok`` or a short reason; with the fallback, the
        latest switch changes, each group's fallback depth and the length of its dead
        stream (None while Redis is away)."""
        postgres, redis = await asyncio.gather(self._probe_postgres(), self._probe_redis())
        report: dict[str, Any] = {
            "mode": self.mode,
            "postgres": postgres,
            "rabbitmq": "ok" if self.publisher.connected else "disconnected",
            "redis": redis,
            "history": [],
            "fallback_depth": None,
            "fallback_dead": None,
        }
        if self.switch is not None and redis == "ok":
            try:
                async with asyncio.timeout(PROBE_TIMEOUT):
                    report["history"] = await self.switch.history(READY_HISTORY)
                    report["fallback_depth"] = await self._depths()
                    report["fallback_dead"] = await self._dead()
            except (FallbackUnavailable, TimeoutError) as exc:
                log.debug("readiness: no switch history or depth (%s)", exc)
        return report

    async def _depths(self) -> dict[str, int]:
        assert self.fallback is not None
        depths = {g: await self.fallback.depth(g) for g in self.settings.groups}
        for group, depth in depths.items():
            FALLBACK_DEPTH.labels(group).set(depth)
        return depths

    async def _dead(self) -> dict[str, int]:
        assert self.fallback is not None
        dead = {g: await self.fallback.dead(g) for g in self.settings.groups}
        for group, length in dead.items():
            FALLBACK_DEAD.labels(group).set(length)
        return dead

    @property
    def mode(self) -> str:
        return self.switch.state.mode.value if self.switch is not None else Mode.NORMAL.value

    async def broker_report(self) -> dict[str, Any]:
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
            report["fallback_depth"] = await self._depths()
            report["fallback_dead"] = await self._dead()
        except FallbackUnavailable as exc:
            report["fallback_error"] = str(exc)
        return report

    async def periodic_report(self) -> dict[str, Any]:
        """The scanners' report job: :meth:`broker_report`, and a log line of the fallback
        depth per group while degraded or while any group has entries left."""
        report = await self.broker_report()
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

    async def _probe_postgres(self) -> str:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                await self.store.ping()
        except (ReliableMsgError, TimeoutError) as exc:
            return f"unavailable: {exc}"
        return "ok"

    async def _probe_redis(self) -> str:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                await ping(self.redis)
        except (FallbackUnavailable, TimeoutError) as exc:
            return f"unavailable: {exc}"
        return "ok"
