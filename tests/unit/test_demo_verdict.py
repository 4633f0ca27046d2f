"""The demo's pure parts: the failure plan, the pay waves and the verdict on the books."""

from __future__ import annotations

import dataclasses

import pytest

from demo.books import Books, OrderRow
from demo.plan import Plan, make_plan, waves
from demo.verdict import Facts, judge

GROUPS = ("inventory", "credit", "wms")


@pytest.mark.parametrize(("orders", "local", "crashes"), [(5, 1, 2), (20, 2, 2), (100, 10, 3)])
def test_plan_places_every_failure(orders: int, local: int, crashes: int) -> None:
    ids = list(range(101, 101 + orders))
    plan = make_plan(ids, GROUPS, seed=1)

    assert len(plan.local_failures) == local
    assert len(plan.upstream_crashes) == crashes
    assert not plan.local_failures & plan.upstream_crashes
    clean = set(ids) - plan.local_failures - plan.upstream_crashes
    for group in GROUPS:
        assert len(plan.consumer_crashes[group]) == crashes
        assert plan.consumer_crashes[group] <= clean
    assert make_plan(ids, GROUPS, seed=1) == plan


def test_plan_needs_enough_orders() -> None:
    with pytest.raises(ValueError):
        make_plan([1, 2, 3, 4], GROUPS, seed=1)


def test_an_order_that_kills_the_order_service_is_paid_alone() -> None:
    plan = Plan(frozenset({2}), frozenset({3, 6}), {})
    assert waves([1, 2, 3, 4, 5, 6], plan) == [[1, 2], [3], [4, 5], [6]]
    assert plan.query(2) == {"fail": "local"}
    assert plan.query(3) == {"crash": "after_commit"}
    assert plan.query(1) == {}


def paid(id: int) -> OrderRow:
    return OrderRow(id, "paid", 2, 10, 98, 2, 1200, 1)


def failed(id: int) -> OrderRow:
    return OrderRow(id, "failed", 2, 10, 100, 0, 1190, 0)


def facts(rows: list[OrderRow], **changes: object) -> Facts:
    ids = [r.id for r in rows]
    n_paid = sum(r.status == "paid" for r in rows)
    base = Facts(
        groups=GROUPS,
        plan=Plan(frozenset(r.id for r in rows if r.status != "paid"), frozenset(), {}),
        books=Books(rows, {g: n_paid for g in GROUPS}, sum(r.deliveries for r in rows)),
        messages={
            f"order-{r.id}-paid": "done" if r.status == "paid" else "cancelled" for r in rows
        },
        counts={"done": n_paid, "cancelled": len(ids) - n_paid},
        crashes={},
        restarts={},
        unexpected_answers=0,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def consistency(rows: list[OrderRow], **changes: object) -> dict[str, int]:
    outcome = judge(facts(rows, **changes))
    return {c.what: c.found for c in outcome.checks if c.area == "consistency"}


def test_books_that_balance() -> None:
    outcome = judge(facts([paid(1), failed(2), paid(3)]))
    assert outcome.balanced
    assert outcome.as_planned


@pytest.mark.parametrize(
    ("row", "check"),
    [
        (dataclasses.replace(paid(1), available=96, sold=4), "double effects (duplicates found)"),
        (dataclasses.replace(paid(1), member_points=1210), "double effects (duplicates found)"),
        (dataclasses.replace(paid(1), deliveries=2), "double effects (duplicates found)"),
        (dataclasses.replace(paid(1), deliveries=0), "paid orders missing an effect"),
        (dataclasses.replace(failed(1), member_points=1200), "unpaid orders with an effect"),
        (dataclasses.replace(paid(1), available=97, sold=2), "books in an impossible state"),
    ],
)
def test_books_that_do_not_balance(row: OrderRow, check: str) -> None:
    found = consistency([row, paid(2)])
    assert found[check] == 1
    assert not judge(facts([row, paid(2)])).balanced


def test_the_service_must_agree_with_the_books() -> None:
    rows = [paid(1), failed(2)]
    found = consistency(rows, messages={"order-1-paid": "sent", "order-2-paid": "cancelled"})
    assert found["orders the service disagrees with"] == 1
