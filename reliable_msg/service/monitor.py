"""The instance's monitor: what the dashboard charts and the gauges that need a look at
the database.

Every ``monitor.interval`` seconds it appends this instance's counters (prepares,
confirms, acks, redeliveries, deaths, check-back errors) to a ring buffer, from which
the dashboard draws rates over time, and sets the scanner lag gauges. Every
``monitor.counts_interval`` seconds it counts messages per status and deliveries per
group and status for the ``rmsg_messages`` and ``rmsg_deliveries`` gauges, and runs the
other counts it was given (the TCC driver's gauges); the dashboard reuses a count
younger than ``monitor.interval`` instead of counting again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

from reliable_msg.aio import stop_task
from reliable_msg.errors import ReliableMsgError
from reliable_msg.metrics import (
    ACKS,
    CHECKBACKS,
    DEAD,
    DELIVERIES,
    MESSAGES,
    REDELIVERIES,
    SCANNER_LAG,
    TRANSITIONS,
)
from reliable_msg.service.ports import Store
from reliable_msg.service.settings import Settings
from reliable_msg.states import DeliveryStatus, MessageStatus

log = logging.getLogger(__name__)


def _total(counter: Counter, **labels: str) -> float:
    """The sum of ``counter`` over the label values that match ``labels``."""
    total = 0.0
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                total += sample.value
    return total


#: The series of the chart: name -> how to read its running total.
SERIES: dict[str, Callable[[], float]] = {
    "prepared": lambda: _total(TRANSITIONS, status=MessageStatus.PENDING.value),
    "sent": lambda: _total(TRANSITIONS, status=MessageStatus.SENT.value),
    "acked": lambda: _total(ACKS),
    "cancelled": lambda: _total(TRANSITIONS, status=MessageStatus.CANCELLED.value),
    "redelivered": lambda: _total(REDELIVERIES),
    "dead": lambda: _total(DEAD),
    "checkback_errors": lambda: _total(CHECKBACKS, outcome="error"),
}


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  #: Unix time
    totals: dict[str, float]


class Monitor:
    """Samples and counts for one instance; :meth:`start` runs it in the background."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        reports: Sequence[Callable[[], Awaitable[None]]] = (),
    ) -> None:
        self._settings = settings
        self._store = store
        self._reports = tuple(reports)
        self._samples: deque[Sample] = deque(maxlen=settings.monitor.samples)
        self._counts: dict[str, Any] | None = None
        self._counted_at = 0.0
        self._counting = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.lag: dict[str, float] = {}

    def start(self) -> None:
        self._stopping.clear()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await stop_task(self._task, within=5.0)
            self._task = None

    async def _run(self) -> None:
        cfg = self._settings.monitor
        while not self._stopping.is_set():
            self.sample()
            try:
                await self._measure_lag()
                await self.counts(max_age=cfg.counts_interval)
            except ReliableMsgError as exc:
                log.debug("monitor: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), cfg.interval)

    def sample(self) -> None:
        """Record this instance's counters now."""
        self._samples.append(Sample(time.time(), {k: read() for k, read in SERIES.items()}))

    def rates(self) -> list[dict[str, float]]:
        """Per second, between each two samples: ``{"at", <series>...}``, oldest first."""
        samples = list(self._samples)
        out = []
        for before, after in itertools.pairwise(samples):
            span = after.at - before.at
            if span <= 0:
                continue
            rates = {k: max(0.0, after.totals[k] - before.totals[k]) / span for k in SERIES}
            out.append({"at": after.at, **rates})
        return out

    async def _measure_lag(self) -> None:
        self.lag = await self._store.scanner_lag()
        for scanner, seconds in self.lag.items():
            SCANNER_LAG.labels(scanner).set(seconds)

    async def counts(self, *, max_age: float | None = None) -> dict[str, Any]:
        """Counts per status, per topic and per group (:meth:`Store.stats`), at most
        ``max_age`` seconds old (default ``monitor.interval``); sets the gauges."""
        max_age = self._settings.monitor.interval if max_age is None else max_age
        async with self._counting:
            if self._counts is None or time.time() - self._counted_at >= max_age:
                self._counts = await self._store.stats()
                self._counted_at = time.time()
                self._set_gauges(self._counts)
                for report in self._reports:
                    await report()
            return {**self._counts, "counted_at": self._counted_at}

    def _set_gauges(self, counts: dict[str, Any]) -> None:
        for status in MessageStatus:
            MESSAGES.labels(status.value).set(counts["messages"].get(status.value, 0))
        groups = set(self._settings.groups) | set(counts["groups"])
        for group in groups:
            for delivery in DeliveryStatus:
                n = counts["groups"].get(group, {}).get(delivery.value, 0)
                DELIVERIES.labels(group, delivery.value).set(n)
