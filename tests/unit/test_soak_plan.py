"""The soak plan: reproducible, every kind of fault before any twice, the server restart
once, faults inside the run and in order, crashes only on orders that commit."""

from __future__ import annotations

from collections import Counter

import pytest

from demo.books import POINTS, QTY, STOCK, Books, OrderRow
from soak.plan import Kind, make_plan
from soak.report import tally

GROUPS = ("inventory", "credit", "wms")
IDS = list(range(1, 5001))


def test_the_same_seed_gives_the_same_plan() -> None:
    one = make_plan(IDS, GROUPS, faults=24, crashes=3, seed=1)
    two = make_plan(IDS, GROUPS, faults=24, crashes=3, seed=1)
    other = make_plan(IDS, GROUPS, faults=24, crashes=3, seed=2)
    assert one == two
    assert one != other


def test_every_kind_comes_before_any_twice_and_the_server_restarts_once() -> None:
    plan = make_plan(IDS, GROUPS, faults=24, crashes=3, seed=4)
    kinds = Counter(f.kind for f in plan.faults)
    assert set(kinds) == set(Kind)
    assert kinds[Kind.PG_RESTART] == 1
    assert sum(kinds.values()) == 24
    assert plan.injected == 24 + 3 + 3 * len(GROUPS)


def test_fewer_faults_than_kinds_draw_no_kind_twice() -> None:
    plan = make_plan(IDS[:300], GROUPS, faults=4, crashes=1, seed=9)
    kinds = [f.kind for f in plan.faults]
    assert len(kinds) == len(set(kinds)) == 4


@pytest.mark.parametrize("seed", range(5))
def test_faults_fall_inside_the_run_in_order(seed: int) -> None:
    plan = make_plan(IDS, GROUPS, faults=30, crashes=2, seed=seed)
    moments = [f.at for f in plan.faults]
    assert moments == sorted(moments)
    assert all(len(IDS) // 20 <= at <= len(IDS) - len(IDS) // 20 for at in moments)


def test_crashes_land_on_orders_that_commit() -> None:
    plan = make_plan(IDS, GROUPS, faults=0, crashes=5, seed=3)
    assert not plan.upstream_crashes & plan.local_failures
    for ids in plan.consumer_crashes.values():
        assert len(ids) == 5
        assert not ids & plan.local_failures and not ids & plan.upstream_crashes
    assert plan.query(min(plan.upstream_crashes)) == {"crash": "after_commit"}
    assert plan.query(min(plan.local_failures)) == {"fail": "local"}


def test_too_few_orders_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="at least 20 orders"):
        make_plan(IDS[:5], GROUPS, faults=1, crashes=1, seed=1)


def _row(order_id: int, status: str, effects: int) -> OrderRow:
    return OrderRow(
        id=order_id,
        status=status,
        qty=QTY,
        points=10,
        available=STOCK - QTY * effects,
        sold=QTY * effects,
        member_points=POINTS + 10 * effects,
        deliveries=effects,
    )


def test_the_tally_counts_lost_duplicated_phantom_and_stuck() -> None:
    books = Books(
        orders=[
            _row(1, "paid", 1),  # fine
            _row(2, "paid", 0),  # lost in every group
            _row(3, "paid", 2),  # applied twice in every group
            _row(4, "failed", 1),  # applied, never committed
            _row(5, "failed", 0),  # fine
        ],
        inbox={},
        delivery_orders=0,
    )
    messages = {
        "order-1-paid": "done",
        "order-2-paid": "sent",
        "order-3-paid": "done",
        "order-4-paid": "cancelled",
        "order-5-paid": "cancelled",
    }
    t = tally(books, messages, GROUPS)
    assert (t.committed, t.failed, t.produced) == (3, 2, 5)
    assert t.lost == dict.fromkeys(GROUPS, 1)
    assert t.duplicated == dict.fromkeys(GROUPS, 1)
    assert t.phantom == dict.fromkeys(GROUPS, 1)
    assert t.stuck == 1
    assert not t.passed

    clean = Books(orders=[_row(1, "paid", 1), _row(5, "failed", 0)], inbox={}, delivery_orders=0)
    t = tally(clean, {"order-1-paid": "done", "order-5-paid": "cancelled"}, GROUPS)
    assert t.passed and t.stuck == 0 and t.disagreements == 0
