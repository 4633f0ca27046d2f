"""Wiring: one object that owns the connections, the use-cases and the scanners of an
instance, started and stopped as a whole."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from reliable_msg.errors import ReliableMsgError
from reliable_msg.service.auth import Authenticator
from reliable_msg.service.checkback_client import CheckBackClient
from reliable_msg.service.group_commit import GroupCommit
from reliable_msg.service.monitor import Monitor
from reliable_msg.service.scanners import CheckBackScanner, Purger, RedeliveryScanner, Scanners
from reliable_msg.service.settings import Settings
from reliable_msg.service.store import PgStore
from reliable_msg.service.tcc.driver import Driver
from reliable_msg.service.tcc.driving import Driving
from reliable_msg.service.tcc.store import TccStore
from reliable_msg.service.tcc.usecases import Coordinator
from reliable_msg.service.usecases import UseCases
from reliable_msg.transports.degradation import PROBE_TIMEOUT, Degradation


def instance_name() -> str:
    """Who flips the switch, in its history: host and process."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Runtime:
    """Everything one service instance runs. Build with :meth:`create`."""

    def __init__(
        self,
        settings: Settings,
        store: PgStore,
        degradation: Degradation,
        checkback: CheckBackClient,
        *,
        scanners: bool,
    ) -> None:
        self.settings = settings
        self.store = store
        self.auth = Authenticator(settings)
        self.degradation = degradation
        self.publisher = degradation.publisher
        self.switch = degradation.switch
        self.usecases = UseCases(settings, store, self.publisher)
        self.group_commit = GroupCommit(self.usecases, settings.group_commit)
        self.checkback_client = checkback
        self.checkback = CheckBackScanner(settings, store, self.usecases, checkback)
        self.redelivery = RedeliveryScanner(settings, store, self.publisher)
        self.tcc_store = TccStore(
            store.pool, instance=instance_name(), stalled_after=settings.tcc.stalled_after
        )
        self.tcc_driver = Driver(settings, Driving(store.pool), instance=instance_name())
        self.coordinator = Coordinator(settings, self.tcc_store, kick=self.tcc_driver.kick)
        self.purger = Purger(settings, store, self.tcc_store)
        self.monitor = Monitor(settings, store, reports=[self.tcc_driver.report])
        self.scanners = (
            Scanners(
                settings,
                self.checkback,
                self.redelivery,
                self.purger,
                degradation.probe,
                degradation.periodic_report,
                self.tcc_driver,
            )
            if scanners
            else None
        )

    @classmethod
    async def create(
        cls, settings: Settings, *, scanners: bool | None = None, wait_for_store: float = 0.0
    ) -> Runtime:
        """Connect to PostgreSQL (must answer, within ``wait_for_store`` seconds); RabbitMQ
        and Redis may come later."""
        store = await PgStore.connect(
            settings.database_url, pool_size=settings.db_pool_size, wait=wait_for_store
        )
        degradation = Degradation(settings, who=instance_name())
        client = CheckBackClient(settings.checkback)
        run_scanners = settings.scanner.enabled if scanners is None else scanners
        return cls(settings, store, degradation, client, scanners=run_scanners)

    async def start(self) -> None:
        await self.degradation.start()
        await self.checkback_client.start()
        await self.tcc_driver.start()
        if self.scanners is not None:
            self.scanners.start()
        self.monitor.start()

    async def stop(self) -> None:
        await self.group_commit.close()
        await self.monitor.stop()
        if self.scanners is not None:
            await self.scanners.stop()
        else:  # passes run by hand (tests, tools) may have left calls in flight
            await self.checkback.stop()
        await self.tcc_driver.stop()
        await self.checkback_client.close()
        await self.degradation.stop()
        await self.store.close()

    @property
    def mode(self) -> str:
        return self.degradation.mode

    async def readiness(self) -> dict[str, Any]:
        """Each dependency's state, as ``ok`` or a short reason, with the mode, the latest
        switch changes and the fallback's depths (see :meth:`Degradation.ready`)."""
        postgres, transports = await asyncio.gather(
            self._probe_postgres(), self.degradation.ready()
        )
        return {"postgres": postgres, **transports}

    async def broker_report(self) -> dict[str, Any]:
        """``broker`` of ``/v1/stats``: :meth:`Degradation.report`."""
        return await self.degradation.report()

    async def _probe_postgres(self) -> str:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                await self.store.ping()
        except (ReliableMsgError, TimeoutError) as exc:
            return f"unavailable: {exc}"
        return "ok"
