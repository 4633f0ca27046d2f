"""The demo's pure parts: the failure plan, the pay waves and phases, what the outage
left in the service's stats and the consumers' logs, and the verdict on all of it."""

from __future__ import annotations

import dataclasses

import pytest

from demo.books import Books, OrderRow
from demo.options import parse
from demo.outage import (
    CAME_BACK,
    NEVER_WENT,
    STAYED,
    ConsumerPath,
    Flip,
    OutageFacts,
    Source,
    consumer_path,
    counter,
    flips,
)
from demo.plan import Phases, Plan, make_plan, phases, waves
from demo.processes import START_MARK
from demo.verdict import Check, Facts, judge

GROUPS = ("inventory", "credit", "wms")


@pytest.mark.parametrize(
    ("orders", "local", "crashes"), [(5, 1, 2), (20, 2, 2), (100, 10, 3), (600, 60, 18)]
)
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


def consistency(rows: list[OrderRow], **changes: object) -> dict[str, int | str]:
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


@pytest.mark.parametrize(
    ("orders", "before", "during"), [(5, 2, 2), (30, 10, 10), (100, 33, 33), (101, 34, 34)]
)
def test_the_outage_takes_the_middle_third(orders: int, before: int, during: int) -> None:
    ids = list(range(1, orders + 1))
    split = phases(ids, outage=True)
    assert (len(split.before), len(split.during)) == (before, during)
    assert split.before + split.during + split.after == ids
    assert split.orders == orders
    assert len(split.during) >= 0.2 * orders


def test_no_outage_pays_everything_before() -> None:
    assert phases([1, 2, 3, 4, 5], outage=False) == Phases([1, 2, 3, 4, 5], [], [])


def log(*lines: str) -> str:
    return "\n".join(lines)


def started() -> str:
    return f"{START_MARK}23:39:21 start: python -m downstream_demo wms"


def said(text: str, group: str = "wms") -> str:
    return f"2026-11-27 23:39:30,000 WARNING reliable_msg.sdk.consumer: consumer {group}: {text}"


TO_REDIS = said("now consuming the Redis fallback shards")
DRAINED = said("fallback shards drained")
TO_RABBITMQ = said("now consuming RabbitMQ")


@pytest.mark.parametrize(
    ("text", "path", "summary"),
    [
        (log(started()), ConsumerPath(0, 0, 0, Source.RABBITMQ), NEVER_WENT),
        (
            log(started(), TO_REDIS, DRAINED, TO_RABBITMQ),
            ConsumerPath(1, 1, 1, Source.RABBITMQ),
            CAME_BACK,
        ),
        (log(started(), TO_REDIS), ConsumerPath(1, 0, 0, Source.REDIS), STAYED),
        # Killed on Redis; the next process went to Redis again and came back.
        (
            log(started(), TO_REDIS, "Traceback", started(), TO_REDIS, DRAINED, TO_RABBITMQ),
            ConsumerPath(2, 1, 1, Source.RABBITMQ),
            CAME_BACK,
        ),
        # Killed on Redis and restarted on RabbitMQ with nothing left to drain.
        (log(started(), TO_REDIS, started()), ConsumerPath(1, 0, 0, Source.RABBITMQ), STAYED),
        # Another group's lines are not this one's.
        (
            log(started(), said("now consuming the Redis fallback shards", "credit")),
            ConsumerPath(0, 0, 0, Source.RABBITMQ),
            NEVER_WENT,
        ),
    ],
)
def test_a_consumers_path_from_its_log(text: str, path: ConsumerPath, summary: str) -> None:
    assert consumer_path(text, "wms") == path
    assert path.summary == summary


def test_switch_history_oldest_first_with_the_service_named() -> None:
    history = [
        {"mode": "normal", "by": "vm:42", "at": 1020.5, "reason": "probe publish confirmed"},
        {"mode": "degraded", "by": "other:7", "at": 1012.25, "reason": "3 failed publishes"},
    ]
    assert flips(history, since=1000.0, service_pid=42) == [
        Flip("degraded", "other:7", 12.25, "3 failed publishes"),
        Flip("normal", "the service (vm:42)", 20.5, "probe publish confirmed"),
    ]
    assert flips([], since=1000.0, service_pid=42) == []


def test_fallback_writes_from_the_metrics() -> None:
    text = log(
        "# TYPE rmsg_fallback_writes_total counter",
        'rmsg_fallback_writes_total{group="inventory"} 33.0',
        'rmsg_fallback_writes_total{group="wms"} 35.0',
        'rmsg_fallback_writes_created{group="wms"} 1.7e+09',
        'rmsg_redeliveries_total{group="wms"} 4.0',
    )
    assert counter(text, "rmsg_fallback_writes_total", "group") == {"inventory": 33, "wms": 35}
    assert counter("", "rmsg_fallback_writes_total", "group") == {}


@pytest.mark.parametrize(
    ("check", "ok", "shown"),
    [
        (Check("a", "b", 3, 3), True, "3"),
        (Check("a", "b", 2, 3), False, "3"),
        (Check("a", "b", 5, 3, at_least=True), True, ">= 3"),
        (Check("a", "b", 2, 3, at_least=True), False, ">= 3"),
        (Check("a", "b", "9.5 s", None), True, ""),
        (Check("a", "b", "normal", "normal"), True, "normal"),
        (Check("a", "b", "degraded", "normal"), False, "normal"),
    ],
)
def test_checks(check: Check, ok: bool, shown: str) -> None:
    assert check.ok is ok
    assert check.expectation == shown


def healed_outage(**changes: object) -> OutageFacts:
    base = OutageFacts(
        stopped_at=9.5,
        started_at=12.0,
        answering_at=12.5,
        planned_paid=1,
        paid=1,
        confirmed=1,
        settled=3,
        planned_settled=3,
        history=[
            Flip("degraded", "the service (vm:1)", 10.0, "3 failed publishes"),
            Flip("normal", "the service (vm:1)", 17.0, "probe"),
        ],
        mode="normal",
        depth={g: 0 for g in GROUPS},
        writes={g: 1 for g in GROUPS},
        paths={g: ConsumerPath(1, 1, 1, Source.RABBITMQ) for g in GROUPS},
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def outage_checks(outage: OutageFacts) -> dict[str, Check]:
    outcome = judge(facts([paid(1), failed(2), paid(3)], outage=outage))
    assert outcome.balanced  # the books are another matter
    return {c.what.split(" (")[0].split(" by ")[0]: c for c in outcome.checks if c.area == "outage"}


def test_an_outage_that_healed() -> None:
    outage = healed_outage()
    outcome = judge(facts([paid(1), failed(2), paid(3)], outage=outage))
    assert outcome.as_planned
    whats = [c.what for c in outcome.checks if c.area == "outage"]
    assert "switch set degraded by the service (vm:1), at 10.0 s" in whats
    assert "switch back to normal by the service (vm:1), at 17.0 s" in whats
    checks = outage_checks(outage)
    assert checks["RabbitMQ stopped: rabbitmqctl stop_app"].found == "9.5 s"
    assert checks["orders paid while it was down"].found == 1
    assert checks["wms: entries left in its Redis shards"].found == 0
    assert checks["credit: consumer went to Redis and came back"].found == "yes"


@pytest.mark.parametrize(
    ("changes", "failing"),
    [
        ({"history": []}, "switch set degraded"),
        ({"history": [], "mode": "degraded"}, "service mode at the end"),
        (
            {"history": [Flip("degraded", "vm:1", 10.0, "3 failed publishes")], "mode": "degraded"},
            "switch back to normal",
        ),
        (
            {"depth": {"inventory": 0, "credit": 2, "wms": 0}},
            "credit: entries left in its Redis shards",
        ),
        ({"depth": {}}, "wms: entries left in its Redis shards"),
        ({"writes": {"inventory": 1, "credit": 1}}, "wms: entries written to its Redis shards"),
        (
            {"paths": {g: ConsumerPath(1, 0, 0, Source.REDIS) for g in GROUPS}},
            "inventory: consumer went to Redis and came back",
        ),
        ({"paths": {}}, "wms: consumer went to Redis and came back"),
        ({"paid": 0}, "orders paid while it was down"),
        ({"settled": 2}, "messages done or cancelled while it was down"),
    ],
)
def test_an_outage_that_did_not_heal_is_not_as_planned(
    changes: dict[str, object], failing: str
) -> None:
    outage = healed_outage(**changes)
    assert not judge(facts([paid(1), failed(2), paid(3)], outage=outage)).as_planned
    assert not outage_checks(outage)[failing].ok


def test_a_switch_that_flipped_twice_still_ends_normal() -> None:
    twice = [
        Flip("degraded", "vm:1", 10.0, "3 failed publishes"),
        Flip("normal", "vm:1", 12.0, "probe"),
        Flip("degraded", "vm:1", 12.5, "3 failed publishes"),
        Flip("normal", "vm:1", 14.0, "probe"),
    ]
    outage = healed_outage(history=twice)
    assert judge(facts([paid(1), failed(2), paid(3)], outage=outage)).as_planned
    whats = [c.what for c in judge(facts([paid(1)], outage=outage)).checks]
    assert "switch back to normal by vm:1, at 14.0 s" in whats


def test_no_outage_no_outage_checks() -> None:
    outcome = judge(facts([paid(1), failed(2)]))
    assert all(c.area != "outage" for c in outcome.checks)


def test_the_outage_is_on_unless_told_otherwise() -> None:
    default = parse([])
    assert default.outage
    assert not parse(["--no-outage"]).outage
    # The consumers follow the switch as the demo's service does.
    assert (default.shards, default.poll_interval, default.names.namespace) == (
        16,
        0.5,
        "rmsgdemo",
    )


def test_orders_are_paid_by_id() -> None:
    assert phases([3, 1, 2, 6, 5, 4], outage=True) == Phases([1, 2], [3, 4], [5, 6])
