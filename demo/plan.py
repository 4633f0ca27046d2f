"""Which orders fail how: a pure function of the order ids and a seed.

- about 10 % of the orders: the payment's local transaction fails (-> cancel);
- a few (at least 2): the order service is killed after its commit and before the
  confirm (-> check-back);
- for each consumer group, a few (at least 2) of the other orders: the consumer is
  killed after its effect committed and before its ack (-> redelivery, no double effect).

With the outage, the orders are paid in three phases: the first third with RabbitMQ up,
the second third with it stopped (-> degradation to Redis), the rest once it is started
again (-> recovery). The failures above fall in any phase, the outage included.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

#: Share of the orders whose local transaction fails.
LOCAL_FAILURE_SHARE = 0.10
#: Fewest crashes of each kind.
MIN_CRASHES = 2
#: One more crash of each kind per this many orders.
ORDERS_PER_CRASH = 33
#: Fewest orders a plan can place every failure in.
MIN_ORDERS = 5
#: RabbitMQ is stopped once this share of the orders is paid...
OUTAGE_FROM = 1 / 3
#: ...and started again once this share more is paid.
OUTAGE_SHARE = 1 / 3


@dataclass(frozen=True, slots=True)
class Plan:
    local_failures: frozenset[int]  #: ``fail=local``
    upstream_crashes: frozenset[int]  #: ``crash=after_commit``
    consumer_crashes: dict[str, frozenset[int]]  #: per group: die after the effect

    def query(self, order_id: int) -> dict[str, str]:
        """The pay request's fault switches for ``order_id``."""
        if order_id in self.local_failures:
            return {"fail": "local"}
        if order_id in self.upstream_crashes:
            return {"crash": "after_commit"}
        return {}

    def expected_paid(self, order_ids: Sequence[int]) -> set[int]:
        return set(order_ids) - self.local_failures


@dataclass(frozen=True, slots=True)
class Phases:
    """The orders in the order they are paid, split around the outage."""

    before: list[int]  #: paid with RabbitMQ up
    during: list[int]  #: paid while RabbitMQ is stopped
    after: list[int]  #: paid once it is started again

    @property
    def orders(self) -> int:
        return len(self.before) + len(self.during) + len(self.after)


def phases(order_ids: Sequence[int], *, outage: bool) -> Phases:
    """The orders by id; without the outage all are paid ``before``, with it the middle
    third (at least one order) is paid ``during``."""
    ids = sorted(order_ids)
    if not outage:
        return Phases(ids, [], [])
    start = round(len(ids) * OUTAGE_FROM)
    end = start + max(1, round(len(ids) * OUTAGE_SHARE))
    return Phases(ids[:start], ids[start:end], ids[end:])


def make_plan(
    order_ids: Sequence[int], groups: Sequence[str], seed: int, *, crashes: int | None = None
) -> Plan:
    """Spread the failures over ``order_ids``; the same inputs give the same plan.
    ``crashes`` of each kind; by default ``MIN_CRASHES``, one more per
    ``ORDERS_PER_CRASH`` orders."""
    if len(order_ids) < MIN_ORDERS:
        raise ValueError(f"a plan needs at least {MIN_ORDERS} orders")
    rng = random.Random(seed)
    ids = sorted(order_ids)
    if crashes is None:
        crashes = max(MIN_CRASHES, len(ids) // ORDERS_PER_CRASH)
    local = set(rng.sample(ids, max(1, round(len(ids) * LOCAL_FAILURE_SHARE))))
    upstream = set(rng.sample([i for i in ids if i not in local], crashes))
    clean = [i for i in ids if i not in local and i not in upstream]
    return Plan(
        local_failures=frozenset(local),
        upstream_crashes=frozenset(upstream),
        consumer_crashes={g: frozenset(rng.sample(clean, crashes)) for g in groups},
    )


def waves(order_ids: Sequence[int], plan: Plan) -> list[list[int]]:
    """The pay requests in waves sent concurrently; an order whose payment kills the
    order service goes alone, so the crash interrupts no other request."""
    result: list[list[int]] = []
    current: list[int] = []
    for order_id in order_ids:
        if order_id in plan.upstream_crashes:
            if current:
                result.append(current)
            result.append([order_id])
            current = []
        else:
            current.append(order_id)
    if current:
        result.append(current)
    return result
