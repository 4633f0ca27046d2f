"""The scanners: check-back of pending messages, redelivery of unacked deliveries and
retention purge, each an APScheduler job of one in-process scheduler per instance.

Every pass claims due rows with ``FOR UPDATE SKIP LOCKED`` (or a lease), so instances
running side by side never handle the same row at once. A pass that fails is logged
and counted; the next one runs on schedule, so the loops outlive a lost dependency.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from .checkback import Answer, CheckBackClient
from .errors import BrokerError, CheckBackError, ReliableMsgError
from .message import DeliveryUpdate, DueCheck, Outgoing
from .metrics import CHECKBACKS, DEAD, REDELIVERIES, SCANNER_ERRORS, TRANSITIONS
from .policy import backoff
from .ports import Publisher, Store
from .publisher import SwitchingPublisher
from .service import MessageService
from .settings import Settings
from .states import D, M

log = logging.getLogger(__name__)

#: Seconds between refreshes of the gauges that need a look at Redis (fallback depth).
REPORT_INTERVAL = 5.0


class CheckBackScanner:
    """Asks producers about messages left ``pending`` past ``checkback.after``."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        service: MessageService,
        client: CheckBackClient,
    ) -> None:
        self._settings = settings
        self._store = store
        self._service = service
        self._client = client

    async def run_once(self) -> int:
        """One pass: claim due messages batch by batch; return how many were asked."""
        total = 0
        cfg = self._settings.checkback
        while True:
            due = await self._store.claim_checks(self._settings.scanner.batch, cfg.lease)
            await asyncio.gather(*(self._check(c) for c in due))
            total += len(due)
            if len(due) < self._settings.scanner.batch:
                return total

    async def _check(self, check: DueCheck) -> None:
        producer = self._settings.producers.get(check.producer)
        try:
            if producer is None:
                raise CheckBackError(f"producer {check.producer!r} is no longer configured")
            answer = await self._client.ask(producer, check)
        except CheckBackError as exc:
            CHECKBACKS.labels(check.producer, "error").inc()
            await self._retry_or_die(check, exc.message)
            return
        CHECKBACKS.labels(check.producer, answer.value).inc()
        await self._apply(check, answer)

    async def _apply(self, check: DueCheck, answer: Answer) -> None:
        if answer is Answer.COMMITTED:
            [result] = await self._service.confirm(None, [check.id])
            if isinstance(result, ReliableMsgError):
                # The lease runs out and a later pass asks again.
                log.warning(
                    "check-back of %s: committed, but %s",
                    check.id,
                    result.message,
                    extra={"message_id": check.id},
                )
            else:
                log.info(
                    "check-back of %s: committed; published",
                    check.id,
                    extra={"message_id": check.id},
                )
        elif answer is Answer.ROLLED_BACK:
            await self._service.cancel(None, [check.id])
            log.info(
                "check-back of %s: rolled back; cancelled", check.id, extra={"message_id": check.id}
            )
        else:
            await self._retry_or_die(check, "producer answered unknown")

    async def _retry_or_die(self, check: DueCheck, error: str) -> None:
        cfg = self._settings.checkback
        tries = check.check_attempts + 1
        if tries >= cfg.max_tries:
            if await self._store.check_failed(check, error, None):
                TRANSITIONS.labels(M.DEAD.value).inc()
                DEAD.labels("checkback").inc()
                log.error(
                    "message %s is dead: no check-back answer after %d tries (%s)",
                    check.id,
                    tries,
                    error,
                    extra={"message_id": check.id},
                )
            return
        delay = backoff(
            tries, base=cfg.backoff_base, factor=cfg.backoff_factor, cap=cfg.backoff_cap
        )
        await self._store.check_failed(check, error, delay)
        log.info(
            "check-back of %s failed (%s); try %d in %.1fs",
            check.id,
            error,
            tries,
            delay,
            extra={"message_id": check.id},
        )


class RedeliveryScanner:
    """Republishes deliveries not acked in time, to their own group's queue only."""

    def __init__(self, settings: Settings, store: Store, broker: Publisher) -> None:
        self._settings = settings
        self._store = store
        self._broker = broker

    async def run_once(self) -> int:
        """One pass: every delivery due now is republished (or made dead) once."""
        total = 0
        batch = self._settings.scanner.batch
        while True:
            claimed = await self._store.redeliver(batch, self._decide)
            total += claimed
            if claimed < batch:
                return total

    async def _decide(self, due: list[Outgoing]) -> list[DeliveryUpdate]:
        exhausted = [o for o in due if o.group and o.attempt > self._settings.max_attempts(o.group)]
        resend = [o for o in due if o not in exhausted]
        results = await asyncio.gather(
            *(self._broker.publish(o) for o in resend), return_exceptions=True
        )
        updates = [self._dead(o) for o in exhausted]
        for out, result in zip(resend, results, strict=True):
            if isinstance(result, BrokerError):
                updates.append(self._refused(out, result.message))
            elif isinstance(result, BaseException):
                raise result
            else:
                updates.append(self._resent(out))
        return updates

    def _resent(self, out: Outgoing) -> DeliveryUpdate:
        assert out.group is not None
        cfg = self._settings.redelivery
        REDELIVERIES.labels(out.group).inc()
        delay = backoff(
            out.attempt - 1,
            base=cfg.backoff_base or cfg.ack_timeout,
            factor=cfg.backoff_factor,
            cap=cfg.backoff_cap,
            jitter=cfg.jitter,
        )
        log.info(
            "redelivered %s to %s (attempt %d)",
            out.id,
            out.group,
            out.attempt,
            extra={"message_id": out.id, "group": out.group},
        )
        return DeliveryUpdate(out.id, out.group, D.SENT, out.attempt, delay)

    def _refused(self, out: Outgoing, reason: str) -> DeliveryUpdate:
        assert out.group is not None
        log.warning(
            "redelivery of %s to %s failed: %s",
            out.id,
            out.group,
            reason,
            extra={"message_id": out.id, "group": out.group},
        )
        retry = self._settings.redelivery.retry_after_failure
        return DeliveryUpdate(out.id, out.group, D.SENT, out.attempt - 1, retry, reason)

    def _dead(self, out: Outgoing) -> DeliveryUpdate:
        assert out.group is not None
        tries = out.attempt - 1
        reason = f"not acked by {out.group} after {tries} deliveries"
        DEAD.labels("redelivery").inc()
        log.error(
            "message %s is dead: %s",
            out.id,
            reason,
            extra={"message_id": out.id, "group": out.group},
        )
        return DeliveryUpdate(out.id, out.group, D.DEAD, tries, 0.0, reason)


class Purger:
    """Deletes ``done`` and ``cancelled`` messages older than the retention period."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self._settings = settings
        self._store = store

    async def run_once(self) -> int:
        cfg = self._settings.scanner
        deleted = await self._store.purge(cfg.retention, batch=max(cfg.batch, 1000))
        if deleted:
            log.info("purged %d finished messages", deleted)
        return deleted


class Scanners:
    """One APScheduler scheduler per instance running the jobs: check-back, redelivery,
    purge, and the recovery probe (which does nothing unless degraded)."""

    def __init__(
        self,
        settings: Settings,
        checkback: CheckBackScanner,
        redelivery: RedeliveryScanner,
        purger: Purger,
        publisher: SwitchingPublisher,
        report: Callable[[], Awaitable[object]],
    ) -> None:
        self._settings = settings
        self._scheduler = AsyncIOScheduler(timezone=UTC)
        self._running: set[asyncio.Task[None]] = set()
        self._jobs: dict[str, Callable[[], Awaitable[int]]] = {
            "checkback": checkback.run_once,
            "redelivery": redelivery.run_once,
            "purge": purger.run_once,
            "probe": lambda: _as_count(publisher.probe()),
            "report": lambda: _as_count(report()),
        }

    def start(self) -> None:
        cfg = self._settings.scanner
        now = datetime.now(UTC)
        for name in ("checkback", "redelivery"):
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
        except Exception:
            SCANNER_ERRORS.labels(name).inc()
            log.exception("%s pass failed; the next pass runs on schedule", name)
        finally:
            self._running.discard(task)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop scheduling and let passes under way finish (up to ``grace`` seconds)."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        if self._running:
            await asyncio.wait(set(self._running), timeout=grace)


async def _as_count(result: Awaitable[object]) -> int:
    return int(bool(await result))
