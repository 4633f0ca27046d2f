"""Redelivery: republish deliveries not acked in time, to their own group's queue."""

from __future__ import annotations

import logging

from reliable_msg.errors import BrokerError, BrokerUnavailable, Unpublishable
from reliable_msg.message import DeliveryUpdate, Publication
from reliable_msg.metrics import DEAD, REDELIVERIES
from reliable_msg.policy import backoff
from reliable_msg.service.ports import Publisher, Store
from reliable_msg.service.publishing import one_by_one
from reliable_msg.service.scanners.refusals import warn_failed
from reliable_msg.service.settings import Settings
from reliable_msg.states import D

log = logging.getLogger(__name__)


class RedeliveryScanner:
    """Republishes deliveries not acked in time, to their own group's queue only.

    A redelivery the broker does not take is tried again after
    ``redelivery.retry_after_failure`` without counting as an attempt. While RabbitMQ is
    away that is all; when it is up and refuses (no queue took it), the refusal is
    counted and, after ``max_refusals`` in a row, the delivery goes ``dead`` (at once for
    a message that can never be published). Each pass logs one warning naming what was
    not published.
    """

    def __init__(self, settings: Settings, store: Store, publisher: Publisher) -> None:
        self._settings = settings
        self._store = store
        self._publish = one_by_one(publisher)
        self._failed: list[tuple[Publication, BrokerError]] = []  # in the pass under way

    async def run_once(self) -> int:
        """One pass: every delivery due now is republished (or made dead) once."""
        total = 0
        batch = self._settings.scanner.batch
        self._failed = []
        try:
            while True:
                claimed = await self._store.redeliver(batch, self._publish, self)
                total += claimed
                if claimed < batch:
                    return total
        finally:
            warn_failed("redelivery", [(f"{o.id} to {o.group}", e) for o, e in self._failed])

    def exhausted(self, out: Publication) -> DeliveryUpdate | None:
        """Dead without a republish when out of attempts; else None (republish it)."""
        if out.group and out.attempt > self._settings.max_attempts(out.group):
            return self._not_acked(out)
        return None

    def published(self, out: Publication, error: BrokerError | None) -> DeliveryUpdate:
        """What a republish makes of the delivery: ``sent`` again with the next backoff,
        or, not taken, tried again later or ``dead`` (see the class docstring)."""
        if error is None:
            return self._resent(out)
        self._failed.append((out, error))
        return self._refused(out, error)

    def _resent(self, out: Publication) -> DeliveryUpdate:
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

    def _refused(self, out: Publication, error: BrokerError) -> DeliveryUpdate:
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

    def _not_acked(self, out: Publication) -> DeliveryUpdate:
        reason = f"not acked by {out.group} after {out.attempt - 1} deliveries"
        return self._dead(out, reason, "redelivery", out.refusals)

    def _dead(self, out: Publication, reason: str, why: str, refusals: int) -> DeliveryUpdate:
        assert out.group is not None
        DEAD.labels(why).inc()
        log.error(
            "message %s is dead: %s",
            out.id,
            reason,
            extra={"message_id": out.id, "group": out.group},
        )
        return DeliveryUpdate(out.id, out.group, D.DEAD, out.attempt - 1, 0.0, reason, refusals)
