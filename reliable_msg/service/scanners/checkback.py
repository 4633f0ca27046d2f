"""Check-back: ask producers about messages left ``pending`` past ``checkback.after``,
with a bounded number of calls in flight per instance and per producer."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

from reliable_msg.aio import stop_task
from reliable_msg.errors import BrokerError, CheckBackError, ReliableMsgError
from reliable_msg.message import DueCheck
from reliable_msg.metrics import CHECKBACKS, DEAD, SCANNER_ERRORS, TRANSITIONS
from reliable_msg.policy import backoff
from reliable_msg.service.checkback_client import Answer, CheckBackClient
from reliable_msg.service.ports import Store
from reliable_msg.service.scanners.refusals import PASS_ERRORS, warn_failed
from reliable_msg.service.settings import Settings
from reliable_msg.service.usecases import UseCases
from reliable_msg.states import M

log = logging.getLogger(__name__)


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
        usecases: UseCases,
        client: CheckBackClient,
    ) -> None:
        self._settings = settings
        self._store = store
        self._usecases = usecases
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
        warn_failed("check-back", unpublished)
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
        except PASS_ERRORS as exc:
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
        except PASS_ERRORS as exc:
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
            [result] = await self._usecases.confirm(None, [check.id])
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
            await self._usecases.cancel(None, [check.id])
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
