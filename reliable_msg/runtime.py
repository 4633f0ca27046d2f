"""Wiring: one object that owns the connections, the use-cases and the scanners of an
instance, started and stopped as a whole."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import redis.asyncio as aioredis

from .auth import Authenticator
from .broker import RabbitBroker
from .checkback import CheckBackClient
from .errors import ReliableMsgError
from .scanners import CheckBackScanner, Purger, RedeliveryScanner, Scanners
from .service import MessageService
from .settings import Settings
from .store import PgStore

log = logging.getLogger(__name__)

#: How long a readiness probe waits for each dependency.
PROBE_TIMEOUT = 2.0


class Runtime:
    """Everything one service instance runs. Build with :meth:`create`."""

    def __init__(
        self,
        settings: Settings,
        store: PgStore,
        broker: RabbitBroker,
        checkback: CheckBackClient,
        redis: aioredis.Redis,
        *,
        scanners: bool,
    ) -> None:
        self.settings = settings
        self.store = store
        self.broker = broker
        self.redis = redis
        self.auth = Authenticator(settings)
        self.service = MessageService(settings, store, broker)
        self.checkback_client = checkback
        self.checkback = CheckBackScanner(settings, store, self.service, checkback)
        self.redelivery = RedeliveryScanner(settings, store, broker)
        self.purger = Purger(settings, store)
        self.scanners = (
            Scanners(settings, self.checkback, self.redelivery, self.purger) if scanners else None
        )

    @classmethod
    async def create(cls, settings: Settings, *, scanners: bool | None = None) -> Runtime:
        """Connect to PostgreSQL (must answer) and RabbitMQ (may come later)."""
        store = await PgStore.connect(settings.database_url, pool_size=settings.db_pool_size)
        broker = RabbitBroker(settings)
        client = CheckBackClient(settings.checkback)
        redis = aioredis.Redis.from_url(settings.redis_url, socket_timeout=PROBE_TIMEOUT)
        run_scanners = settings.scanner.enabled if scanners is None else scanners
        return cls(settings, store, broker, client, redis, scanners=run_scanners)

    async def start(self) -> None:
        await self.broker.start()
        await self.checkback_client.start()
        if self.scanners is not None:
            self.scanners.start()

    async def stop(self) -> None:
        if self.scanners is not None:
            await self.scanners.stop()
        await self.checkback_client.close()
        await self.broker.close()
        await self.redis.aclose()
        await self.store.close()

    async def readiness(self) -> dict[str, Any]:
        """Each dependency's state, as ``ok`` or a short reason."""
        postgres, redis = await asyncio.gather(self._probe_postgres(), self._probe_redis())
        return {
            "mode": "normal",
            "postgres": postgres,
            "rabbitmq": "ok" if self.broker.connected else "disconnected",
            "redis": redis,
        }

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
                await self.redis.ping()
        except (aioredis.RedisError, OSError, TimeoutError) as exc:
            return f"unavailable: {exc}"
        return "ok"
