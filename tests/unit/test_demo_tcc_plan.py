"""The demo's TCC plan and its option: pure."""

from __future__ import annotations

import pytest

from demo.options import parse
from demo.tcc.plan import Fault, make_plan

ORDERS = 8
PLAN = make_plan(ORDERS, seed=7)


def test_the_plan_places_every_fault_once_and_kills_the_coordinator_last() -> None:
    assert sorted(PLAN.faults.values()) == sorted(Fault)
    assert PLAN.faults[ORDERS] is Fault.COORDINATOR_KILLED
    assert make_plan(ORDERS, seed=7) == PLAN
    waves = PLAN.waves()
    assert sorted(i for w in waves for i in w) == list(range(1, ORDERS + 1))
    assert all(len(w) == 1 for w in waves if w[0] in PLAN.faults)
    with pytest.raises(ValueError, match="at least"):
        make_plan(len(Fault), seed=7)


def test_the_tcc_part_runs_12_orders_unless_told_otherwise() -> None:
    assert parse([]).tcc_orders == 12
    assert parse(["--tcc-orders", "0"]).tcc_orders == 0  # skipped
    assert parse(["--tcc-orders", str(len(Fault) + 1)]).tcc_orders == len(Fault) + 1
    with pytest.raises(SystemExit):
        parse(["--tcc-orders", str(len(Fault))])  # too few for every fault and a normal one
