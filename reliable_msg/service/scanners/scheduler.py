"""The scheduler: one APScheduler per instance runs the scanners' passes (check-back,
redelivery, purge, the TCC driver), the recovery probe and the periodic report. A pass that fails is
logged and counted; the next one runs on schedule, so the loops outlive a lost
dependency."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from reliable_msg.metrics import SCANNER_ERRORS
from reliable_msg.service.scanners.checkback import CheckBackScanner
from reliable_msg.service.scanners.purger import Purger
from reliable_msg.service.scanners.redelivery import RedeliveryScanner
from reliable_msg.service.scanners.refusals import PASS_ERRORS
from reliable_msg.service.settings import Settings
from reliable_msg.service.tcc.driver import Driver

log = logging.getLogger(__name__)

#: Seconds between refreshes of the gauges that need a look at Redis (fallback depth).
REPORT_INTERVAL = 5.0


class Scanners:
    """One APScheduler scheduler per instance running the jobs: check-back, redelivery,
    purge, the TCC driver's pass (``tcc``), and the recovery probe (which does nothing
    unless degraded)."""

    def __init__(
        self,
        settings: Settings,
        checkback: CheckBackScanner,
        redelivery: RedeliveryScanner,
        purger: Purger,
        probe: Callable[[], Awaitable[object]],
        report: Callable[[], Awaitable[object]],
        tcc: Driver,
    ) -> None:
        self._settings = settings
        self._checkback = checkback
        self._scheduler = AsyncIOScheduler(timezone=UTC)
        self._running: set[asyncio.Task[None]] = set()
        self._jobs: dict[str, Callable[[], Awaitable[int]]] = {
            "checkback": checkback.run_once,
            "redelivery": redelivery.run_once,
            "purge": purger.run_once,
            # Not waiting for its rounds: a branch slow to answer delays no pass.
            "tcc": lambda: tcc.run_once(wait=False),
            "probe": lambda: _as_count(probe()),
            "report": lambda: _as_count(report()),
        }

    def start(self) -> None:
        cfg = self._settings.scanner
        now = datetime.now(UTC)
        for name in ("checkback", "redelivery", "tcc"):
            self._add(name, cfg.interval, now)
        self._add("purge", cfg.purge_interval, now)
        self._add("probe", self._settings.fallback.probe_interval, now)
        self._add("report", REPORT_INTERVAL, now)
        self._scheduler.start()

    def _add(self, name: str, interval: float, first: datetime) -> None:
        self._scheduler.add_job(
            self._guarded,
            "interval",
            args=[name],
            id=name,
            seconds=interval,
            next_run_time=first,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )

    async def _guarded(self, name: str) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._running.add(task)
        try:
            await self._jobs[name]()
        except PASS_ERRORS as exc:
            # A dependency away: a line each pass until it is back, not a traceback each.
            SCANNER_ERRORS.labels(name).inc()
            log.warning("%s pass failed (%s); the next pass runs on schedule", name, exc)
        except Exception:
            SCANNER_ERRORS.labels(name).inc()
            log.exception("%s pass failed; the next pass runs on schedule", name)
        finally:
            self._running.discard(task)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop scheduling, let passes under way finish (up to ``grace`` seconds), then
        stop the check-back calls they started (see :meth:`CheckBackScanner.stop`)."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        if self._running:
            await asyncio.wait(set(self._running), timeout=grace)
        await self._checkback.stop(grace)


async def _as_count(result: Awaitable[object]) -> int:
    return int(bool(await result))
