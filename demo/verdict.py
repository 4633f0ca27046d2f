"""Do the books balance? A pure judgement over what the run left in the databases.

The books balance when every paid order has exactly one effect in each of inventory,
credit and wms, every unpaid order has none, and the service agrees: a paid order's
message is ``done``, an unpaid order's is ``cancelled`` (or was never prepared). The
other checks say whether each injected failure happened and healed as planned, the
outage included: the service's switch went degraded and back to normal, the orders paid
meanwhile went through Redis, whose shards are empty at the end, and every consumer went
to Redis and came back to RabbitMQ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from upstream_demo.store import POINTS_PER_ORDER, message_id

from .books import POINTS, QTY, STOCK, Books, OrderRow
from .outage import CAME_BACK, ConsumerPath, OutageFacts, Source
from .plan import Plan

#: The area of the checks that decide whether the books balance.
CONSISTENCY = "consistency"
#: The area of the outage phase's checks.
OUTAGE = "outage"


@dataclass(frozen=True, slots=True)
class Facts:
    """Everything the run observed."""

    groups: tuple[str, ...]
    plan: Plan
    books: Books
    messages: dict[str, str]  #: status by message id (GET /v1/messages)
    counts: dict[str, int]  #: messages per status (GET /v1/stats)
    crashes: dict[str, int]  #: injected consumer crashes that happened, per group
    restarts: dict[str, int]  #: restarts per process
    unexpected_answers: int  #: pay requests answered otherwise than planned
    outage: OutageFacts | None = None  #: None when the run had no outage phase


@dataclass(frozen=True, slots=True)
class Check:
    """``found`` must equal ``expected`` (or be at least it); no ``expected``: a fact
    shown for information."""

    area: str
    what: str
    found: int | str
    expected: int | str | None
    at_least: bool = False

    @property
    def ok(self) -> bool:
        if self.expected is None:
            return True
        if self.at_least and isinstance(self.found, int) and isinstance(self.expected, int):
            return self.found >= self.expected
        return self.found == self.expected

    @property
    def expectation(self) -> str:
        if self.expected is None:
            return ""
        return f">= {self.expected}" if self.at_least else str(self.expected)


@dataclass(frozen=True, slots=True)
class Outcome:
    checks: list[Check]

    @property
    def balanced(self) -> bool:
        return all(c.ok for c in self.checks if c.area == CONSISTENCY)

    @property
    def as_planned(self) -> bool:
        return all(c.ok for c in self.checks)


def judge(facts: Facts) -> Outcome:
    rows = facts.books.orders
    paid = [r for r in rows if r.status == "paid"]
    return Outcome(
        [
            *_orders(facts, rows, paid),
            *_faults(facts, rows),
            *_messages(facts, paid, rows),
            *_inventory(facts, rows, paid),
            *_credit(facts, rows, paid),
            *_wms(facts, rows, paid),
            *(_outage(facts.outage, facts.groups, len(rows)) if facts.outage else []),
            *_consistency(facts, rows),
        ]
    )


# -- what each order left in each book ---------------------------------------------------


def inventory_effects(row: OrderRow) -> int | None:
    """How many times the order took its stock; None if the product's books are broken."""
    if row.available is None or row.sold is None:
        return None
    if row.available + row.sold != STOCK or row.sold % row.qty:
        return None
    return row.sold // row.qty


def credit_effects(row: OrderRow) -> int | None:
    """How many times the order credited its points; None if they do not add up."""
    if row.member_points is None or row.points <= 0:
        return None
    gained = row.member_points - POINTS
    if gained < 0 or gained % row.points:
        return None
    return gained // row.points


def wms_effects(row: OrderRow) -> int:
    return row.deliveries


EFFECTS: dict[str, Callable[[OrderRow], int | None]] = {
    "inventory": inventory_effects,
    "credit": credit_effects,
    "wms": wms_effects,
}


# -- the checks, area by area ------------------------------------------------------------


def _orders(facts: Facts, rows: list[OrderRow], paid: list[OrderRow]) -> list[Check]:
    ids = [r.id for r in rows]
    return [
        Check("orders", "paid", len(paid), len(facts.plan.expected_paid(ids))),
        Check(
            "orders",
            "failed (local transaction rolled back)",
            _count(rows, "failed"),
            len(facts.plan.local_failures),
        ),
        Check("orders", "still created", _count(rows, "created"), 0),
        Check("orders", "pay answers other than planned", facts.unexpected_answers, 0),
    ]


def _faults(facts: Facts, rows: list[OrderRow]) -> list[Check]:
    plan = facts.plan
    status = {r.id: r.status for r in rows}
    message = {r.id: facts.messages.get(message_id(r.id)) for r in rows}
    checks = [
        Check(
            "faults",
            "local tx failed -> order failed, message cancelled",
            sum(
                status.get(i) == "failed" and message.get(i) == "cancelled"
                for i in plan.local_failures
            ),
            len(plan.local_failures),
        ),
        Check(
            "faults",
            "order service killed after commit -> paid via check-back",
            sum(
                status.get(i) == "paid" and message.get(i) == "done" for i in plan.upstream_crashes
            ),
            len(plan.upstream_crashes),
        ),
        Check(
            "faults",
            "order service restarts",
            facts.restarts.get("order", 0),
            len(plan.upstream_crashes),
        ),
    ]
    for group in facts.groups:
        planned = len(plan.consumer_crashes.get(group, ()))
        checks += [
            Check(
                "faults",
                f"{group} killed after effect, before ack",
                facts.crashes.get(group, 0),
                planned,
            ),
            Check("faults", f"{group} restarts", facts.restarts.get(group, 0), planned),
        ]
    return checks


def _messages(facts: Facts, paid: list[OrderRow], rows: list[OrderRow]) -> list[Check]:
    counts = facts.counts
    return [
        Check("messages", "done", counts.get("done", 0), len(paid)),
        Check("messages", "cancelled", counts.get("cancelled", 0), len(rows) - len(paid)),
        *(Check("messages", s, counts.get(s, 0), 0) for s in ("pending", "sent", "dead")),
    ]


def _inventory(facts: Facts, rows: list[OrderRow], paid: list[OrderRow]) -> list[Check]:
    taken = sum(r.available == STOCK - QTY and r.sold == QTY for r in rows)
    untouched = sum(r.available == STOCK and r.sold == 0 for r in rows)
    return [
        Check("inventory", f"products at {STOCK - QTY} available / {QTY} sold", taken, len(paid)),
        Check("inventory", f"products untouched at {STOCK} / 0", untouched, len(rows) - len(paid)),
        Check("inventory", "products at anything else", len(rows) - taken - untouched, 0),
        Check("inventory", "inbox rows", facts.books.inbox.get("inventory", 0), len(paid)),
    ]


def _credit(facts: Facts, rows: list[OrderRow], paid: list[OrderRow]) -> list[Check]:
    credited = sum(r.member_points == POINTS + r.points for r in rows)
    untouched = sum(r.member_points == POINTS for r in rows)
    return [
        Check(
            "credit",
            f"members credited {POINTS} -> {POINTS + POINTS_PER_ORDER}",
            credited,
            len(paid),
        ),
        Check("credit", f"members untouched at {POINTS}", untouched, len(rows) - len(paid)),
        Check("credit", "members at anything else", len(rows) - credited - untouched, 0),
        Check("credit", "inbox rows", facts.books.inbox.get("credit", 0), len(paid)),
    ]


def _wms(facts: Facts, rows: list[OrderRow], paid: list[OrderRow]) -> list[Check]:
    return [
        Check("wms", "sale delivery orders", facts.books.delivery_orders, len(paid)),
        Check(
            "wms", "paid orders with exactly one", sum(r.deliveries == 1 for r in paid), len(paid)
        ),
        Check("wms", "inbox rows", facts.books.inbox.get("wms", 0), len(paid)),
    ]


def _outage(o: OutageFacts, groups: tuple[str, ...], orders: int) -> list[Check]:
    share = f"{o.paid / orders:.0%}" if orders else "-"
    checks = [
        Check(OUTAGE, "RabbitMQ stopped: rabbitmqctl stop_app", _at(o.stopped_at), None),
        Check(OUTAGE, "RabbitMQ started: rabbitmqctl start_app", _at(o.started_at), None),
        Check(OUTAGE, f"orders paid while it was down ({share})", o.paid, o.planned_paid),
        Check(
            OUTAGE,
            "messages done or cancelled while it was down",
            o.settled,
            o.planned_settled,
        ),
        *_switch(o),
    ]
    for group in groups:
        path = o.paths.get(group, ConsumerPath(0, 0, 0, Source.RABBITMQ))
        checks += [
            Check(
                OUTAGE,
                f"{group}: entries written to its Redis shards",
                o.writes.get(group, 0),
                o.confirmed,
                at_least=True,
            ),
            Check(OUTAGE, f"{group}: entries left in its Redis shards", _depth(o, group), 0),
            Check(
                OUTAGE,
                f"{group}: consumer went to Redis and came back (logged {path.to_redis}x to"
                f" Redis, {path.to_rabbitmq}x back)",
                "yes" if path.summary == CAME_BACK else "no",
                "yes",
            ),
        ]
    return checks


def _switch(o: OutageFacts) -> list[Check]:
    """The history alternates from normal, so at least one flip of each mode and normal
    at the end means degraded, then normal."""
    checks = []
    # The first trip and the last recovery, should it have flipped more than once.
    for mode, words, pick in (
        ("degraded", "switch set degraded", 0),
        ("normal", "switch back to normal", -1),
    ):
        found = [f for f in o.history if f.mode == mode]
        by = f" by {found[pick].by}, at {found[pick].at:.1f} s" if found else ""
        checks.append(Check(OUTAGE, words + by, len(found), 1, at_least=True))
    checks.append(Check(OUTAGE, "service mode at the end", o.mode or "unknown", "normal"))
    return checks


def _depth(o: OutageFacts, group: str) -> int | str:
    return o.depth.get(group, "unknown")


def _at(seconds: float | None) -> str:
    """Seconds into the run."""
    return f"{seconds:.1f} s" if seconds is not None else "never"


def _consistency(facts: Facts, rows: list[OrderRow]) -> list[Check]:
    duplicates = missing = phantom = broken = 0
    for row in rows:
        should = 1 if row.status == "paid" else 0
        for effects in EFFECTS.values():
            n = effects(row)
            if n is None:
                broken += 1
                continue
            duplicates += max(0, n - 1)
            missing += int(should == 1 and n == 0)
            phantom += int(should == 0 and n > 0)
    return [
        Check(CONSISTENCY, "double effects (duplicates found)", duplicates, 0),
        Check(CONSISTENCY, "paid orders missing an effect", missing, 0),
        Check(CONSISTENCY, "unpaid orders with an effect", phantom, 0),
        Check(CONSISTENCY, "books in an impossible state", broken, 0),
        Check(CONSISTENCY, "orders the service disagrees with", _disagreements(facts, rows), 0),
    ]


def _disagreements(facts: Facts, rows: list[OrderRow]) -> int:
    """Paid orders whose message is not done; unpaid ones whose message is not cancelled."""
    wrong = 0
    for row in rows:
        status = facts.messages.get(message_id(row.id))
        if row.status == "paid":
            wrong += status != "done"
        else:
            wrong += status not in (None, "cancelled")
    return wrong


def _count(rows: list[OrderRow], status: str) -> int:
    return sum(r.status == status for r in rows)
