"""The outage phase as the run saw it: RabbitMQ stopped mid-run, then started again.

The facts come from the service (its switch history and fallback depth in
``GET /v1/stats``, its fallback writes in ``/metrics``) and from the consumers' logs (the
consumer SDK logs each change of source); :mod:`demo.verdict` judges them. Everything
here is pure: the runner does the reading.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .processes import START_MARK

#: What the consumer SDK logs when a consumer changes source (``reliable_msg.sdk.consumer``).
TO_REDIS = "now consuming the Redis fallback shards"
TO_RABBITMQ = "now consuming RabbitMQ"
DRAINED = "fallback shards drained"
#: A consumer's path through one outage.
CAME_BACK = "to Redis and back"
NEVER_WENT = "never went to Redis"
STAYED = "went to Redis, did not come back"
#: The service's counter of entries written to a group's fallback shards.
FALLBACK_WRITES = "rmsg_fallback_writes_total"


class Source(StrEnum):
    RABBITMQ = "RabbitMQ"
    REDIS = "Redis"


@dataclass(frozen=True, slots=True)
class ConsumerPath:
    """One consumer group's sources over the run, from the log of all its processes."""

    to_redis: int  #: times it went to the Redis fallback shards
    drained: int  #: times it drained them
    to_rabbitmq: int  #: times it went back to RabbitMQ
    now: Source  #: where its last process consumes at the end

    @property
    def summary(self) -> str:
        if not self.to_redis:
            return NEVER_WENT
        if self.now is Source.REDIS or not self.drained:
            return STAYED
        return CAME_BACK


def consumer_path(log: str, group: str) -> ConsumerPath:
    """Read ``group``'s log: each process starts on RabbitMQ and logs every change."""
    to_redis = drained = to_rabbitmq = 0
    now = Source.RABBITMQ
    for line in log.splitlines():
        if line.startswith(START_MARK):
            now = Source.RABBITMQ
        elif f"consumer {group}: {TO_REDIS}" in line:
            to_redis += 1
            now = Source.REDIS
        elif f"consumer {group}: {DRAINED}" in line:
            drained += 1
        elif f"consumer {group}: {TO_RABBITMQ}" in line:
            to_rabbitmq += 1
            now = Source.RABBITMQ
    return ConsumerPath(to_redis, drained, to_rabbitmq, now)


@dataclass(frozen=True, slots=True)
class Flip:
    """One change of the degradation switch."""

    mode: str
    by: str  #: the instance that flipped it
    at: float  #: seconds into the run
    reason: str


def flips(
    history: Sequence[dict[str, Any]], *, since: float, service_pid: int | None
) -> list[Flip]:
    """``broker.history`` of ``GET /v1/stats`` (newest first) as flips, oldest first;
    ``since`` is the run's start (epoch seconds), and the demo's service is named."""
    return [
        Flip(
            mode=str(h.get("mode")),
            by=_who(str(h.get("by")), service_pid),
            at=float(h.get("at") or since) - since,
            reason=str(h.get("reason") or ""),
        )
        for h in reversed(history)
    ]


def _who(by: str, service_pid: int | None) -> str:
    """An instance is ``host:pid``; the demo's own service is called so."""
    if service_pid is not None and by.rsplit(":", 1)[-1] == str(service_pid):
        return f"the service ({by})"
    return by


def counter(metrics: str, name: str, label: str) -> dict[str, int]:
    """The samples of counter ``name`` in Prometheus text, by the value of ``label``."""
    pattern = re.compile(rf'^{re.escape(name)}\{{(?:.*,)?{re.escape(label)}="([^"]*)".*\}} (\S+)$')
    found: dict[str, int] = {}
    for line in metrics.splitlines():
        match = pattern.match(line)
        if match:
            found[match.group(1)] = int(float(match.group(2)))
    return found


@dataclass(frozen=True, slots=True)
class OutageFacts:
    """What the run observed of the outage; times are seconds into the run."""

    stopped_at: float | None  #: ``rabbitmqctl stop_app`` returned
    started_at: float | None  #: ``rabbitmqctl start_app`` returned
    answering_at: float | None  #: RabbitMQ took an AMQP connection again
    planned_paid: int  #: orders paid during the outage, by the plan
    paid: int  #: orders paid while RabbitMQ was down
    confirmed: int  #: of those, confirmed by the order service itself (not check-back)
    settled: int  #: messages done or cancelled before RabbitMQ was started again
    planned_settled: int  #: messages of the orders paid before it was started again
    history: list[Flip]  #: the switch's changes, oldest first
    mode: str | None  #: the service's mode at the end
    depth: dict[str, int]  #: entries left in each group's fallback shards
    writes: dict[str, int]  #: entries the service wrote to each group's fallback shards
    paths: dict[str, ConsumerPath]
