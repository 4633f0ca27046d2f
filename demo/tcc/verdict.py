"""Do the TCC books balance? A pure judgement over what the TCC part left in the four
participants' schemas and in the coordinator.

They balance when every order is PAYED with all four effects confirmed (stock 98
available, 0 frozen, 2 sold; points 1200, none prepared; one sale delivery order
CREATED) or CANCELED with none left (its product and member as seeded, no sale delivery
order but CANCELED ones); no stock frozen and no points prepared anywhere; stock and
points conserved; and the coordinator agrees: a PAYED order's transaction confirmed, a
CANCELED one's cancelled. The other checks say whether each injected fault happened and
healed as planned, and whether every transaction is final, none stalled.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..books import POINTS, QTY, STOCK
from ..verdict import CONSISTENCY, Check, Outcome
from .books import CREDIT, TccBooks, TccRow
from .plan import Fault, TccPlan
from .shop import gid

FAULTS = "tcc faults"


@dataclass(frozen=True, slots=True)
class Killed:
    """The coordinator instance killed mid-confirm."""

    instance: str  #: its events' ``instance`` (host:pid)
    status: str | None  #: its transaction's status when it was killed


@dataclass(frozen=True, slots=True)
class TccFacts:
    plan: TccPlan
    books: TccBooks
    transactions: dict[str, str]  #: status by gid (GET /v1/tcc/transactions)
    stalled: int  #: transactions flagged stalled
    unexpected_answers: int  #: pay requests answered otherwise than planned
    restarts: dict[str, int]  #: restarts per process
    events: dict[int, list[dict[str, Any]]]  #: faulted order -> its transaction's events
    late_try: str | None  #: the late Try's answer, as the participant recorded it
    killed: Killed | None


def tcc_summary(outcome: Outcome | None, facts: TccFacts | None) -> dict[str, Any] | None:
    """The TCC part in the run's ``summary.json``; None when it did not run."""
    if outcome is None or facts is None:
        return None
    return {
        "balanced": outcome.balanced,
        "as_planned": outcome.as_planned,
        "faults": {str(i): f.value for i, f in facts.plan.faults.items()},
        "restarts": facts.restarts,
        "killed": asdict(facts.killed) if facts.killed is not None else None,
        "checks": [asdict(c) | {"ok": c.ok} for c in outcome.checks],
    }


def confirmed(row: TccRow) -> bool:
    """All four effects of a payed order, each once."""
    return (
        (row.available, row.frozen, row.sold) == (STOCK - QTY, 0, QTY)
        and (row.points, row.prepare_add_credit) == (POINTS + CREDIT, 0)
        and row.deliveries.get("CREATED") == 1
        and row.deliveries.get("UNKNOWN", 0) == 0
    )


def untouched(row: TccRow, plan: TccPlan) -> bool:
    """No effect left: the books as seeded (a sold-out product stays sold out), no sale
    delivery order but CANCELED ones."""
    sold_out = plan.faults.get(row.id) is Fault.REFUSED
    seeded = (0, 0, STOCK) if sold_out else (STOCK, 0, 0)
    return (
        (row.available, row.frozen, row.sold) == seeded
        and (row.points, row.prepare_add_credit) == (POINTS, 0)
        and set(row.deliveries) <= {"CANCELED"}
    )


def judge(facts: TccFacts) -> Outcome:
    rows = facts.books.orders
    payed = [r for r in rows if r.status == "PAYED"]
    canceled = [r for r in rows if r.status == "CANCELED"]
    expected = len(facts.plan.expected_payed)
    return Outcome(
        [
            Check("tcc orders", "PAYED", len(payed), expected),
            Check("tcc orders", "CANCELED", len(canceled), facts.plan.orders - expected),
            Check("tcc orders", "pay answers other than planned", facts.unexpected_answers, 0),
            *_faults(facts),
            *_books(facts, rows, len(payed)),
            *_coordinator(facts, len(payed), len(canceled)),
            *_consistency(facts, rows, len(payed)),
        ]
    )


def _faults(facts: TccFacts) -> list[Check]:
    plan = facts.plan
    status = {r.id: r.status for r in facts.books.orders}
    checks = []
    for order_id, fault in plan.faults.items():
        ends = "PAYED" if fault.payed else "CANCELED"
        seen = status.get(order_id) == ends and _happened(facts, order_id, fault)
        what = f"order {order_id}: {fault.label} -> {ends}"
        checks.append(Check(FAULTS, what, "yes" if seen else "no", "yes"))
    for process, fault in (
        ("tcc-wms", Fault.DOWN_IN_CONFIRM),
        ("tcc-order", Fault.INITIATOR_KILLED),
    ):
        checks.append(
            Check(
                FAULTS,
                f"{process} restarts",
                facts.restarts.get(process, 0),
                int(fault in plan.faults.values()),
            )
        )
    return checks


def _happened(facts: TccFacts, order_id: int, fault: Fault) -> bool:
    """Whether the coordinator's and the participants' records show the fault."""
    events = facts.events.get(order_id, [])
    origins = facts.books.try_origins
    if fault is Fault.REFUSED:
        # refused, it rolled back: the Cancel found no Try (an empty rollback)
        return origins.get(("inventory", f"stock-{order_id}")) == "cancel"
    if fault is Fault.DB_DOWN:
        return origins.get(("credit", f"points-{order_id}")) == "cancel"  # empty rollback
    if fault is Fault.DOWN_IN_CONFIRM:
        return _calls(events, f"delivery-{order_id}", "confirm", "failed") >= 1
    if fault is Fault.INITIATOR_KILLED:
        return any(e["op"] == "expire" for e in events)
    if fault is Fault.COORDINATOR_KILLED:
        k = facts.killed
        ok = [e for e in events if e["branch"] == f"points-{order_id}" and e["op"] == "confirm"]
        return (
            k is not None
            and k.status == "confirming"
            and any(e["outcome"] == "ok" and e["instance"] != k.instance for e in ok)
        )
    late = facts.late_try or ""
    return (
        origins.get(("wms", f"delivery-{order_id}")) == "cancel"
        and late.startswith("409")
        and "cancelled_before_try" in late
    )


def _calls(events: list[dict[str, Any]], branch: str, op: str, outcome: str) -> int:
    return sum(e["branch"] == branch and e["op"] == op and e["outcome"] == outcome for e in events)


def _books(facts: TccFacts, rows: list[TccRow], payed: int) -> list[Check]:
    plan = facts.plan
    taken = sum((r.available, r.frozen, r.sold) == (STOCK - QTY, 0, QTY) for r in rows)
    credited = sum((r.points, r.prepare_add_credit) == (POINTS + CREDIT, 0) for r in rows)
    kept = sum((r.points, r.prepare_add_credit) == (POINTS, 0) for r in rows)
    created = sum(r.deliveries.get("CREATED", 0) for r in rows)
    seeded = sum(
        (r.available, r.frozen, r.sold)
        == ((0, 0, STOCK) if plan.faults.get(r.id) is Fault.REFUSED else (STOCK, 0, 0))
        for r in rows
    )
    others = len(rows) - payed
    return [
        Check(
            "tcc inventory",
            f"products at {STOCK - QTY} available / 0 frozen / {QTY} sold",
            taken,
            payed,
        ),
        Check("tcc inventory", "products as seeded (100 / 0 / 0, or sold out)", seeded, others),
        Check("tcc inventory", "products at anything else", len(rows) - taken - seeded, 0),
        Check("tcc credit", f"members at {POINTS + CREDIT} points, 0 prepared", credited, payed),
        Check("tcc credit", f"members at {POINTS} points, 0 prepared", kept, others),
        Check("tcc credit", "members at anything else", len(rows) - credited - kept, 0),
        Check("tcc wms", "sale delivery orders CREATED", created, payed),
        Check(
            "tcc wms",
            "sale delivery orders CANCELED",
            sum(r.deliveries.get("CANCELED", 0) for r in rows),
            None,
        ),
        Check(
            "tcc wms",
            "sale delivery orders UNKNOWN",
            sum(r.deliveries.get("UNKNOWN", 0) for r in rows),
            0,
        ),
    ]


def _coordinator(facts: TccFacts, payed: int, canceled: int) -> list[Check]:
    statuses = list(facts.transactions.values())
    unfinished = sum(s not in ("confirmed", "cancelled") for s in statuses)
    return [
        Check("tcc coordinator", "transactions confirmed", statuses.count("confirmed"), payed),
        Check("tcc coordinator", "transactions cancelled", statuses.count("cancelled"), canceled),
        Check(
            "tcc coordinator",
            "transactions not final (trying, confirming, cancelling)",
            unfinished,
            0,
        ),
        Check("tcc coordinator", "transactions stalled", facts.stalled, 0),
    ]


def _consistency(facts: TccFacts, rows: list[TccRow], payed: int) -> list[Check]:
    plan = facts.plan
    return [
        Check(
            CONSISTENCY,
            "PAYED orders missing a confirmed effect",
            sum(r.status == "PAYED" and not confirmed(r) for r in rows),
            0,
        ),
        Check(
            CONSISTENCY,
            "CANCELED orders with an effect left",
            sum(r.status == "CANCELED" and not untouched(r, plan) for r in rows),
            0,
        ),
        Check(
            CONSISTENCY,
            "orders missing from a participant's books",
            plan.orders - len(rows),
            0,
        ),
        Check(
            CONSISTENCY,
            "orders neither PAYED nor CANCELED",
            sum(r.status not in ("PAYED", "CANCELED") for r in rows),
            0,
        ),
        Check(CONSISTENCY, "frozen stock left", sum(r.frozen for r in rows), 0),
        Check(CONSISTENCY, "prepared points left", sum(r.prepare_add_credit for r in rows), 0),
        Check(
            CONSISTENCY,
            f"products whose available + frozen + sold != {STOCK}",
            sum(r.available + r.frozen + r.sold != STOCK for r in rows),
            0,
        ),
        Check(
            CONSISTENCY,
            f"points ({POINTS} x orders + {CREDIT} x PAYED)",
            sum(r.points for r in rows),
            POINTS * len(rows) + CREDIT * payed,
        ),
        Check(CONSISTENCY, "orders the coordinator disagrees with", _disagreements(facts, rows), 0),
    ]


def _disagreements(facts: TccFacts, rows: list[TccRow]) -> int:
    """PAYED orders whose transaction is not confirmed; others whose transaction is not
    cancelled (a CANCELED order went through its Try, so its transaction was begun)."""
    wrong = 0
    for row in rows:
        status = facts.transactions.get(gid(row.id))
        wrong += status != ("confirmed" if row.status == "PAYED" else "cancelled")
    return wrong
