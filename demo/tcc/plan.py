"""Which TCC order meets which fault: a pure function of the order count and a seed.

Every fault meets one order; the others are paid normally. The orders are paid in id
order, the normal ones in concurrent waves, each faulted one alone; the coordinator is
killed at the last order (the instance killed is the one the order service talks to, so
the orders after it would have no coordinator to begin with).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum


class Fault(StrEnum):
    REFUSED = "refused"
    DB_DOWN = "db_down"
    DOWN_IN_CONFIRM = "down_in_confirm"
    INITIATOR_KILLED = "initiator_killed"
    COORDINATOR_KILLED = "coordinator_killed"
    LATE_TRY = "late_try"

    @property
    def payed(self) -> bool:
        """Whether the order ends PAYED despite the fault."""
        return self in (Fault.DOWN_IN_CONFIRM, Fault.COORDINATOR_KILLED)

    @property
    def says(self) -> str:
        """What the plan announces."""
        return SAYS[self]

    @property
    def label(self) -> str:
        """The fault in a row of the table."""
        return LABELS[self]


#: Which participant each fault strikes.
STRUCK = {
    Fault.REFUSED: "inventory",
    Fault.DB_DOWN: "credit",
    Fault.DOWN_IN_CONFIRM: "wms",
    Fault.INITIATOR_KILLED: "order",
    Fault.COORDINATOR_KILLED: "credit",  #: whose Confirm is slow meanwhile
    Fault.LATE_TRY: "wms",
}
SAYS = {
    Fault.REFUSED: "inventory refuses its Try (sold out) -> every branch cancelled",
    Fault.DB_DOWN: "credit's database is down during its Try -> cancelled",
    Fault.DOWN_IN_CONFIRM: "wms dies during its Confirm, restarted -> retried until confirmed",
    Fault.INITIATOR_KILLED: "the order service (initiator) is killed after its Trys, before"
    " its commit -> cancelled at the deadline",
    Fault.COORDINATOR_KILLED: "the coordinator instance is killed mid-confirm (credit's"
    " Confirm is slow) -> finished by the other instance",
    Fault.LATE_TRY: "wms's Try is held back; the Cancel overtakes it -> empty rollback, the"
    " late Try refused",
}
LABELS = {
    Fault.REFUSED: "inventory refused its Try (sold out)",
    Fault.DB_DOWN: "credit's database down in its Try",
    Fault.DOWN_IN_CONFIRM: "wms down in its Confirm, retried",
    Fault.INITIATOR_KILLED: "initiator killed before its commit, deadline",
    Fault.COORDINATOR_KILLED: "coordinator killed mid-confirm, other instance",
    Fault.LATE_TRY: "Cancel overtook wms's Try, late Try refused",
}
#: Fewest orders a plan can place every fault in, with a normal order beside them.
MIN_ORDERS = len(Fault) + 1


@dataclass(frozen=True, slots=True)
class TccPlan:
    orders: int  #: orders 1..orders
    faults: dict[int, Fault]  #: order id -> its fault

    def fault(self, order_id: int) -> Fault | None:
        return self.faults.get(order_id)

    def of(self, fault: Fault) -> int:
        return next(i for i, f in self.faults.items() if f is fault)

    @property
    def expected_payed(self) -> set[int]:
        return {
            i for i in range(1, self.orders + 1) if (f := self.faults.get(i)) is None or f.payed
        }

    def waves(self) -> list[list[int]]:
        """The pay requests in waves: the normal orders between two faulted ones together,
        each faulted one alone."""
        result: list[list[int]] = []
        current: list[int] = []
        for i in range(1, self.orders + 1):
            if i in self.faults:
                result += [current, [i]] if current else [[i]]
                current = []
            else:
                current.append(i)
        return [*result, current] if current else result


def make_plan(orders: int, seed: int) -> TccPlan:
    """Spread the faults over orders 1..``orders``; the same inputs give the same plan."""
    if orders < MIN_ORDERS:
        raise ValueError(f"a TCC plan needs at least {MIN_ORDERS} orders")
    rng = random.Random(seed)
    others = [f for f in Fault if f is not Fault.COORDINATOR_KILLED]
    ids = rng.sample(range(1, orders), len(others))
    faults: dict[int, Fault] = dict(zip(ids, others, strict=True))
    faults[orders] = Fault.COORDINATOR_KILLED
    return TccPlan(orders, dict(sorted(faults.items())))
