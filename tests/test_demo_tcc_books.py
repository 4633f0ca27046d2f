"""The demo's TCC verdict and exit status over real books: the four participants' real
steps run behind their real barriers (``Participant.run``) in a database of this test
run, as the TCC part's plan has them (each fault's order paid or cancelled as it ends),
then read back from PostgreSQL and judged, before and after a tampering that a lost
Confirm or a Cancel that never ran would have left."""

from __future__ import annotations

import io
import json
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest
from rich.console import Console

from demo import books as message_books
from demo import report
from demo.runner import exit_status
from demo.tcc import books
from demo.tcc.plan import Fault, TccPlan, make_plan
from demo.tcc.shop import PARTICIPANTS, Faults, branches, gid, order_of, participant
from demo.tcc.verdict import Killed, TccFacts, judge
from demo.verdict import Outcome
from reliable_msg.sdk.tcc import Branch, Call, Op, Participant
from tests.conftest import SERVER_URL

ORDERS = 8
PLAN = make_plan(ORDERS, seed=7)
TOKEN = "tcc-books-token"


@pytest.fixture
async def tcc_db(tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """The TCC books in a database of this test run, every order paid or cancelled as
    the plan has it; the dsn and the late Try's answer."""
    dsn = f"{SERVER_URL}/rmsg_test_{os.getpid()}_tccbooks"
    await books.reset(dsn, ORDERS, sold_out={PLAN.of(Fault.REFUSED)})
    try:
        late = await pay_or_cancel(dsn, tmp_path)
        yield dsn, late
    finally:
        await message_books.drop_database(dsn)


async def pay_or_cancel(dsn: str, state: Path) -> str:
    """Run each order's Trys, then its Confirms or Cancels, through the participants;
    the late Try's answer (``status body``)."""
    faults = Faults(frozenset(), frozenset(), frozenset(), 0.0, state)
    pools = {
        name: await asyncpg.create_pool(
            dsn, min_size=1, max_size=2, server_settings={"search_path": books.SCHEMAS[name]}
        )
        for name in PARTICIPANTS
    }
    late = ""
    try:
        parties = {name: participant(name, pools[name], TOKEN, faults) for name in PARTICIPANTS}
        orders = await pools["order"].fetch("SELECT * FROM orders ORDER BY id")
        for order in orders:
            fault = PLAN.fault(order["id"])
            calls = branches(order)

            if fault is Fault.LATE_TRY:  # wms's Cancel before its Try
                assert await run_calls(parties, calls, Op.TRY, "wms") == [200] * 3
                assert await run_calls(parties, calls, Op.CANCEL) == [200] * 4
                wms = next(b for b in calls if b.participant == "wms")
                answer = await parties["wms"].run(
                    Call(gid(order["id"]), wms.branch, Op.TRY, wms.payload)
                )
                late = f"{answer.status_code} {bytes(answer.body).decode()}"
                continue
            skip = "credit" if fault is Fault.DB_DOWN else ""  # its Try never got through
            tried = await run_calls(parties, calls, Op.TRY, skip)
            if fault is Fault.REFUSED:
                assert 409 in tried
            else:
                assert tried == [200] * len(tried)
            payed = fault is None or fault.payed
            assert await run_calls(parties, calls, Op.CONFIRM if payed else Op.CANCEL) == [200] * 4
    finally:
        for pool in pools.values():
            await pool.close()
    return late


async def run_calls(
    parties: dict[str, Participant], calls: list[Branch], op: Op, skip: str = ""
) -> list[int]:
    """Call ``op`` of every branch (but ``skip``'s) behind its barrier; the statuses."""
    answers = []
    for b in calls:
        if b.participant != skip:
            call = Call(gid(order_of(b.branch) or 0), b.branch, op, b.payload)
            answers.append((await parties[b.participant].run(call)).status_code)
    return answers


def facts_of(read: books.TccBooks, plan: TccPlan, late: str) -> TccFacts:
    """What a run that left these books reported: the coordinator's final statuses and
    each fault's traces as a run records them."""
    payed = plan.expected_payed
    down, coordinator = plan.of(Fault.DOWN_IN_CONFIRM), plan.of(Fault.COORDINATOR_KILLED)

    def event(
        branch: str | None, op: str, outcome: str, instance: str = "a:1"
    ) -> dict[str, object]:
        return {"branch": branch, "op": op, "outcome": outcome, "instance": instance}

    return TccFacts(
        plan=plan,
        books=read,
        transactions={
            gid(i): "confirmed" if i in payed else "cancelled" for i in range(1, plan.orders + 1)
        },
        stalled=0,
        unexpected_answers=0,
        restarts={"tcc-wms": 1, "tcc-order": 1},
        events={
            down: [
                event(f"delivery-{down}", "confirm", "failed"),
                event(f"delivery-{down}", "confirm", "ok"),
            ],
            plan.of(Fault.INITIATOR_KILLED): [event(None, "expire", "ok")],
            coordinator: [event(f"points-{coordinator}", "confirm", "ok", "a:1")],
        },
        late_try=late,
        killed=Killed("b:2", "confirming"),
    )


async def verdict_of(dsn: str, late: str) -> tuple[Outcome, str, int]:
    """The TCC outcome, the printed verdict and the demo's exit status for these books
    (its message part balanced)."""
    outcome = judge(facts_of(await books.read(dsn), PLAN, late))
    console = Console(file=io.StringIO(), record=True, width=300)
    report.tcc_verdict(console, outcome)
    return outcome, console.export_text(), exit_status(Outcome([]), settled=True, tcc=outcome)


async def test_tcc_books_of_the_plan_balance(tcc_db: tuple[str, str]) -> None:
    dsn, late = tcc_db
    assert (
        late.startswith("409 ") and json.loads(late[4:])["error"]["code"] == "cancelled_before_try"
    )
    outcome, printed, status = await verdict_of(dsn, late)
    assert outcome.balanced and outcome.as_planned, [c for c in outcome.checks if not c.ok]
    assert "TCC verdict: BALANCED" in printed
    assert status == 0


def payed_order() -> int:
    return min(i for i in PLAN.expected_payed if i not in PLAN.faults)


def cancelled_order() -> int:
    return PLAN.of(Fault.DB_DOWN)


TAMPERINGS = {
    "a confirmed branch missing (credit's points still prepared)": (
        "UPDATE tcc_credit.members SET points = points - 10, prepare_add_credit = 10"
        " WHERE id = {payed}",
        {
            "PAYED orders missing a confirmed effect",
            "prepared points left",
            "points (1190 x orders + 10 x PAYED)",
        },
    ),
    "frozen stock left over (a Cancel that never ran)": (
        "UPDATE tcc_inventory.products SET available = available - 2, frozen = frozen + 2"
        " WHERE sku = 'TCC-{cancelled:05d}'",
        {"CANCELED orders with an effect left", "frozen stock left"},
    ),
    "a PAYED order's sale delivery order cancelled": (
        "UPDATE tcc_wms.sale_delivery_orders SET status = 'CANCELED' WHERE order_id = {payed}",
        {"PAYED orders missing a confirmed effect"},
    ),
    "a sale delivery order left UNKNOWN (a Cancel that never ran)": (
        "UPDATE tcc_wms.sale_delivery_orders SET status = 'UNKNOWN' WHERE order_id = {cancelled}",
        {"CANCELED orders with an effect left"},
    ),
    "an order stuck UPDATING": (
        "UPDATE tcc_order.orders SET status = 'UPDATING' WHERE id = {cancelled}",
        {"orders neither PAYED nor CANCELED"},
    ),
    "a Confirm applied twice (points added twice)": (
        "UPDATE tcc_credit.members SET points = points + 10 WHERE id = {payed}",
        {"PAYED orders missing a confirmed effect", "points (1190 x orders + 10 x PAYED)"},
    ),
    "an order's member row gone (the order drops out of the books)": (
        "DELETE FROM tcc_credit.members WHERE id = {payed}",
        {"orders missing from a participant's books"},
    ),
}


@pytest.mark.parametrize("tampering", TAMPERINGS)
async def test_tampered_tcc_books_do_not_balance_and_the_demo_exits_1(
    tcc_db: tuple[str, str], tampering: str
) -> None:
    dsn, late = tcc_db
    sql, failing = TAMPERINGS[tampering]
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql.format(payed=payed_order(), cancelled=cancelled_order()))
    finally:
        await conn.close()
    outcome, printed, status = await verdict_of(dsn, late)
    assert not outcome.balanced
    failed = {c.what for c in outcome.checks if c.area == "consistency" and not c.ok}
    assert failed == failing
    assert "TCC verdict: NOT BALANCED - " in printed
    assert all(what in printed for what in failing)
    assert status == 1


COORDINATOR_WRONGS: dict[str, Callable[[dict[str, str]], dict[str, str]]] = {
    "a CANCELED order's transaction confirmed": lambda txs: (
        txs | {gid(cancelled_order()): "confirmed"}
    ),
    "a CANCELED order's transaction absent": lambda txs: {
        g: s for g, s in txs.items() if g != gid(cancelled_order())
    },
    "a PAYED order's transaction still confirming": lambda txs: (
        txs | {gid(payed_order()): "confirming"}
    ),
}


@pytest.mark.parametrize("wrong", COORDINATOR_WRONGS)
async def test_coordinator_disagreeing_with_the_tcc_books_does_not_balance(
    tcc_db: tuple[str, str], wrong: str
) -> None:
    dsn, late = tcc_db
    facts = facts_of(await books.read(dsn), PLAN, late)
    outcome = judge(replace(facts, transactions=COORDINATOR_WRONGS[wrong](facts.transactions)))
    failed = {c.what for c in outcome.checks if c.area == "consistency" and not c.ok}
    assert failed == {"orders the coordinator disagrees with"}
    assert not outcome.balanced
    assert exit_status(Outcome([]), settled=True, tcc=outcome) == 1
