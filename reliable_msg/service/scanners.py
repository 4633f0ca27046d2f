"""The scanners: check-back of pending messages, redelivery of unacked deliveries and
retention purge, each an APScheduler job of one in-process scheduler per instance.

Every pass claims due rows with ``FOR UPDATE SKIP LOCKED`` (or a lease), so instances
running side by side never handle the same row at once. A pass that fails is logged
and counted; the next one runs on schedule, so the loops outlive a lost dependency.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from reliable_msg.aio import stop_task
from reliable_msg.errors import (
    BrokerError,
    BrokerUnavailable,
    CheckBackError,
    ReliableMsgError,
    StoreError,
    Unpublishable,
)
from reliable_msg.message import DeliveryUpdate, DueCheck, Outgoing
from reliable_msg.metrics import CHECKBACKS, DEAD, REDELIVERIES, SCANNER_ERRORS, TRANSITIONS
from reliable_msg.policy import backoff
from reliable_msg.service.checkback import Answer, CheckBackClient
from reliable_msg.service.ports import Publisher, Store
from reliable_msg.service.settings import Settings
from reliable_msg.service.usecases import MessageService
from reliable_msg.states import D, M

log = logging.getLogger(__name__)

#: Seconds between refreshes of the gauges that need a look at Redis (fallback depth).
REPORT_INTERVAL = 5.0


class Slots:
    """The check-back calls in flight in one instance: at most ``total`` at once, and at
    most ``per_producer`` of them to any one producer, so that one producer's stalled
    endpoint cannot take every slot."""

    def __init__(self, total: int, per_producer: int) -> None:
        self.total = total
        self.per_producer = min(per_producer, total)
        self._busy: Counter[str] = Counter()
        self._used = 0

    @property
    def free(self) -> int:
        return self.total - self._used

    def full(self) -> list[str]:
        """Producers with no free slot: a claim skips their messages."""
        return sorted(p for p, n in self._busy.items() if n >= self.per_producer)

    def take(self, producer: str) -> bool:
        """Take a slot for a call to ``producer``, if one is free."""
        if self._used >= self.total or self._busy[producer] >= self.per_producer:
            return False
        self._busy[producer] += 1
        self._used += 1
        return True

    def give_back(self, producer: str) -> None:
        self._used -= 1
        self._busy[producer] -= 1
        if self._busy[producer] <= 0:
            del self._busy[producer]


class CheckBackScanner:
    """Asks producers about messages left ``pending`` past ``checkback.after``.

    A pass claims only as many due messages as there are free call slots, starts each
    call as a task of its own and returns: it never waits for a producer, so a slow or
    stalled endpoint holds its own slots (``checkback.per_producer`` at most) until its
    calls time out, and the other producers' messages are asked in the meantime. The
    lease keeps a claimed message hidden from other passes and instances while its call
    runs. When a call ends while more messages were due than there were slots, the freed
    slot is filled at once rather than at the next pass.
    """

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
        cfg = settings.checkback
        self._slots = Slots(cfg.concurrency, cfg.per_producer)
        self._calls: set[asyncio.Task[None]] = set()
        self._asking: set[asyncio.Task[Any]] = set()  # calls still waiting for an answer
        self._filling = asyncio.Lock()
        self._backlog = False  # the last claim left due messages behind
        self._refill: asyncio.Task[None] | None = None
        self._stopping = False
        #: committed messages whose publish the broker did not take since the last pass
        self._unpublished: list[tuple[str, BrokerError]] = []

    async def run_once(self) -> int:
        """One pass: start a call for each due message there is a free slot for; return
        how many were started. The calls go on after the pass returns."""
        unpublished, self._unpublished = self._unpublished, []
        _warn_failed("check-back", unpublished)
        return await self._fill()

    async def _fill(self) -> int:
        started = 0
        cfg = self._settings.checkback
        async with self._filling:
            while not self._stopping and self._slots.free:
                want = min(self._slots.free, self._settings.scanner.batch)
                due = await self._store.claim_checks(want, cfg.lease, self._slots.full())
                left = []
                for check in due:
                    if self._stopping or not self._slots.take(check.producer):
                        left.append(check)
                    else:
                        self._start(check)
                if left:
                    # Their producer's slots filled up within this claim, or we are stopping.
                    await self._store.release_checks([c.id for c in left])
                started += len(due) - len(left)
                self._backlog = len(due) == want or bool(left)
                if len(due) < want:
                    break
        return started

    def _start(self, check: DueCheck) -> None:
        task = asyncio.create_task(self._call(check), name=f"check-back of {check.id}")
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _call(self, check: DueCheck) -> None:
        try:
            await self._check(check)
        except asyncio.CancelledError:
            log.info(
                "check-back of %s stopped at shutdown; asked again when its lease ends",
                check.id,
                extra={"message_id": check.id},
            )
            raise
        except (StoreError, BrokerError) as exc:
            # A dependency away: a line per call, not a traceback.
            SCANNER_ERRORS.labels("checkback").inc()
            log.warning(
                "check-back of %s failed (%s); asked again when its lease ends",
                check.id,
                exc,
                extra={"message_id": check.id},
            )
        except Exception:
            SCANNER_ERRORS.labels("checkback").inc()
            log.exception(
                "check-back of %s failed; asked again when its lease ends",
                check.id,
                extra={"message_id": check.id},
            )
        finally:
            self._slots.give_back(check.producer)
            self._fill_soon()

    def _fill_soon(self) -> None:
        """Fill a freed slot now when messages are waiting for one."""
        if self._stopping or not self._backlog:
            return
        if self._refill is None or self._refill.done():
            self._refill = asyncio.create_task(self._fill_guarded(), name="check-back refill")

    async def _fill_guarded(self) -> None:
        try:
            await self._fill()
        except (StoreError, BrokerError) as exc:
            SCANNER_ERRORS.labels("checkback").inc()
            log.warning("check-back refill failed (%s); the next pass runs on schedule", exc)
        except Exception:
            SCANNER_ERRORS.labels("checkback").inc()
            log.exception("check-back refill failed; the next pass runs on schedule")

    async def stop(self, grace: float = 10.0) -> None:
        """Start no more calls; cancel those still waiting for an answer (their messages
        are asked again when the lease ends) and let those recording an answer finish,
        for up to ``grace`` seconds."""
        self._stopping = True
        if self._refill is not None:
            await stop_task(self._refill, within=grace)
        for task in list(self._asking):
            task.cancel()
        if not self._calls:
            return
        _, late = await asyncio.wait(set(self._calls), timeout=grace)
        for task in late:
            task.cancel()
        await asyncio.gather(*self._calls, return_exceptions=True)

    async def _check(self, check: DueCheck) -> None:
        try:
            answer = await self._ask(check)
        except CheckBackError as exc:
            CHECKBACKS.labels(check.producer, "error").inc()
            await self._retry_or_die(check, exc.message)
            return
        CHECKBACKS.labels(check.producer, answer.value).inc()
        await self._apply(check, answer)

    async def _ask(self, check: DueCheck) -> Answer:
        producer = self._settings.producers.get(check.producer)
        if producer is None:
            raise CheckBackError(f"producer {check.producer!r} is no longer configured")
        task = asyncio.current_task()
        assert task is not None
        self._asking.add(task)
        try:
            return await self._client.ask(producer, check)
        finally:
            self._asking.discard(task)

    async def _apply(self, check: DueCheck, answer: Answer) -> None:
        if answer is Answer.COMMITTED:
            [result] = await self._service.confirm(None, [check.id])
            if isinstance(result, BrokerError):
                # A refusal was counted by the confirm (an outage is not); the message
                # is asked about again when its lease runs out.
                self._unpublished.append((check.id, result))
            elif isinstance(result, ReliableMsgError):
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
    """Republishes deliveries not acked in time, to their own group's queue only.

    A redelivery the broker does not take is tried again after
    ``redelivery.retry_after_failure`` without counting as an attempt. While RabbitMQ is
    away that is all; when it is up and refuses (no queue took it), the refusal is
    counted and, after ``max_refusals`` in a row, the delivery goes ``dead`` (at once for
    a message that can never be published). Each pass logs one warning naming what was
    not published.
    """

    def __init__(self, settings: Settings, store: Store, broker: Publisher) -> None:
        self._settings = settings
        self._store = store
        self._broker = broker
        self._failed: list[tuple[Outgoing, BrokerError]] = []  # in the pass under way

    async def run_once(self) -> int:
        """One pass: every delivery due now is republished (or made dead) once."""
        total = 0
        batch = self._settings.scanner.batch
        self._failed = []
        try:
            while True:
                claimed = await self._store.redeliver(batch, self._decide)
                total += claimed
                if claimed < batch:
                    return total
        finally:
            _warn_failed("redelivery", [(f"{o.id} to {o.group}", e) for o, e in self._failed])

    async def _decide(self, due: list[Outgoing]) -> list[DeliveryUpdate]:
        exhausted = [o for o in due if o.group and o.attempt > self._settings.max_attempts(o.group)]
        resend = [o for o in due if o not in exhausted]
        results = await asyncio.gather(
            *(self._broker.publish(o) for o in resend), return_exceptions=True
        )
        updates = [self._not_acked(o) for o in exhausted]
        for out, result in zip(resend, results, strict=True):
            if isinstance(result, BrokerError):
                self._failed.append((out, result))
                updates.append(self._refused(out, result))
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

    def _refused(self, out: Outgoing, error: BrokerError) -> DeliveryUpdate:
        assert out.group is not None
        retry = self._settings.redelivery.retry_after_failure
        tries = out.attempt - 1
        if isinstance(error, BrokerUnavailable):  # an outage: nothing to count
            return DeliveryUpdate(
                out.id, out.group, D.SENT, tries, retry, error.message, out.refusals
            )
        refusals = out.refusals + 1
        limit = 1 if isinstance(error, Unpublishable) else self._settings.max_refusals
        if refusals < limit:
            return DeliveryUpdate(out.id, out.group, D.SENT, tries, retry, error.message, refusals)
        reason = error.message
        if limit > 1:
            reason = f"the broker refused it {refusals} times; last: {reason}"
        return self._dead(out, reason, "refused", refusals)

    def _not_acked(self, out: Outgoing) -> DeliveryUpdate:
        reason = f"not acked by {out.group} after {out.attempt - 1} deliveries"
        return self._dead(out, reason, "redelivery", out.refusals)

    def _dead(self, out: Outgoing, reason: str, why: str, refusals: int) -> DeliveryUpdate:
        assert out.group is not None
        DEAD.labels(why).inc()
        log.error(
            "message %s is dead: %s",
            out.id,
            reason,
            extra={"message_id": out.id, "group": out.group},
        )
        return DeliveryUpdate(out.id, out.group, D.DEAD, out.attempt - 1, 0.0, reason, refusals)


#: How many refused publishes one warning names; the rest are counted.
WARN_NAMES = 20


def _warn_failed(scanner: str, failed: list[tuple[str, BrokerError]]) -> None:
    """One warning for a pass's publishes the broker did not take, by error (each is
    tried again later, or is dead: an error line says so)."""
    if not failed:
        return
    # Named up to a bound: a pass refused wholesale must not log one line of every id.
    by_error: dict[str, list[str]] = {}
    for what, error in failed[:WARN_NAMES]:
        by_error.setdefault(f"{error.code}: {error.message}", []).append(what)
    named = "; ".join(f"{error} ({', '.join(whats)})" for error, whats in by_error.items())
    if len(failed) > WARN_NAMES:
        named += f"; and {len(failed) - WARN_NAMES} more"
    log.warning("%s pass: %d publishes refused or failed: %s", scanner, len(failed), named)


class Purger:
    """Deletes ``done`` and ``cancelled`` messages older than the retention period."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self._settings = settings
        self._store = store

    async def run_once(self) -> int:
        cfg = self._settings.scanner
        batch = max(cfg.batch, 1000)
        deleted = await self._store.purge(cfg.retention, batch=batch)
        if deleted:
            log.info("purged %d finished messages", deleted)
        if cfg.id_retention is not None:
            freed = await self._store.forget_ids(cfg.id_retention, batch=batch)
            if freed:
                log.info("freed %d ids of purged messages", freed)
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
        probe: Callable[[], Awaitable[object]],
        report: Callable[[], Awaitable[object]],
    ) -> None:
        self._settings = settings
        self._checkback = checkback
        self._scheduler = AsyncIOScheduler(timezone=UTC)
        self._running: set[asyncio.Task[None]] = set()
        self._jobs: dict[str, Callable[[], Awaitable[int]]] = {
            "checkback": checkback.run_once,
            "redelivery": redelivery.run_once,
            "purge": purger.run_once,
            "probe": lambda: _as_count(probe()),
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
        except (StoreError, BrokerError) as exc:
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
