"""The demo's verdict and exit status over real books: orders paid in the order
service's schema, handled by the three groups' real handlers through the consumer SDK
(inbox included), then read back from PostgreSQL and judged, before and after a
tampering that a second delivery or a lost one would have left."""

from __future__ import annotations

import io
import os
from collections.abc import AsyncIterator

import asyncpg
import pytest
from rich.console import Console

from demo import books, report
from demo.plan import Plan
from demo.runner import exit_status
from demo.verdict import Facts, Outcome, judge
from downstream_demo.groups import GROUPS
from reliable_msg.sdk.consumer import Consumer, Received
from tests.conftest import AMQP_URL, SERVER_URL
from upstream_demo import store

ORDERS = 5


@pytest.fixture
async def demo_db() -> AsyncIterator[str]:
    """The demo's books in a database of this test run, seeded, with every order paid
    and handled once by each group."""
    dsn = f"{SERVER_URL}/rmsg_test_{os.getpid()}_books"
    await books.reset(dsn, ORDERS)
    try:
        await pay_and_handle(dsn)
        yield dsn
    finally:
        await books.drop_database(dsn)


async def pay_and_handle(dsn: str) -> None:
    orders = await store.connect(dsn)
    try:
        paid = []
        async with orders.acquire() as conn:
            for i in range(1, ORDERS + 1):
                created = await store.create(conn, i, books.sku(i), books.QTY, books.PRICE * 2)
                paid.append(await store.mark_paid(conn, created.id))
    finally:
        await orders.close()
    for name, group in GROUPS.items():
        pool = await asyncpg.create_pool(
            dsn, min_size=1, max_size=2, server_settings={"search_path": group.schema}
        )
        try:
            consumer = Consumer(
                name, service_url="http://127.0.0.1:9", token="-", amqp_url=AMQP_URL, pool=pool
            )
            consumer.add_handler("order.paid", group.handler)
            for order in paid:
                assert order is not None
                message = Received(order.message_id, "order.paid", order.paid_event())
                assert await consumer.handle(message)
        finally:
            await pool.close()


async def verdict_of(dsn: str) -> tuple[Outcome, str, int]:
    """The outcome, the printed verdict and the exit status of a run that left these
    books, the service reporting every message done."""
    groups = tuple(GROUPS)
    read = await books.read(dsn, groups)
    ids = [r.id for r in read.orders]
    facts = Facts(
        groups=groups,
        plan=Plan(frozenset(), frozenset(), {g: frozenset() for g in groups}),
        books=read,
        messages={store.message_id(i): "done" for i in ids},
        counts={"done": len(ids)},
        crashes={g: 0 for g in groups},
        restarts={},
        unexpected_answers=0,
    )
    outcome = judge(facts)
    console = Console(file=io.StringIO(), record=True, width=200)
    report.verdict(console, outcome, timed_out=False)
    return outcome, console.export_text(), exit_status(outcome, settled=True)


async def test_books_with_one_effect_per_order_balance(demo_db: str) -> None:
    outcome, printed, status = await verdict_of(demo_db)
    assert outcome.balanced and outcome.as_planned, [c for c in outcome.checks if not c.ok]
    assert "verdict: BALANCED" in printed
    assert status == 0


TAMPERINGS = {
    "a second delivery order": (
        "INSERT INTO wms.delivery_orders (order_id, sku, qty)"
        " SELECT id, sku, qty FROM orders.orders WHERE member_id = 1",
        "double effects (duplicates found)",
    ),
    "stock taken twice": (
        "UPDATE inventory.products SET available = available - 2, sold = sold + 2"
        f" WHERE sku = '{books.sku(2)}'",
        "double effects (duplicates found)",
    ),
    "points never credited": (
        f"UPDATE credit.members SET points = {books.POINTS} WHERE id = 3",
        "paid orders missing an effect",
    ),
}


@pytest.mark.parametrize("tampering", TAMPERINGS)
async def test_tampered_books_do_not_balance_and_the_demo_exits_1(
    demo_db: str, tampering: str
) -> None:
    sql, failed_check = TAMPERINGS[tampering]
    conn = await asyncpg.connect(demo_db)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()
    outcome, printed, status = await verdict_of(demo_db)
    assert not outcome.balanced
    assert f"verdict: NOT BALANCED - {failed_check}" in printed
    assert status == 1
