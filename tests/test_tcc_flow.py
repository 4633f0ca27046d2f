"""TCC end to end: the coordinator as a ``reliable-msg serve`` process, the seed's four
participants (tests/helpers/tcc_shop.py: the initiator's own order step, inventory,
credit, wms) as uvicorn servers with their own tables, and the initiator SDK in the test
(or in a process of its own that is killed). Every global transaction ends all done or
all undone, each effect once."""

from __future__ import annotations

import ast
import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from fastapi import FastAPI

from reliable_msg.errors import TryFailed, TryRefused
from reliable_msg.sdk.tcc import Initiator
from reliable_msg.service.settings import Settings
from tests.conftest import PRODUCER, settings_for, unique_names
from tests.helpers import tcc_shop
from tests.helpers.servers import serving_app
from tests.helpers.service import remove_traces, running, write_config
from tests.helpers.tcc_shop import branches, effects, member, stock
from tests.helpers.waiting import wait_until

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Scope]]
Send = Callable[[Scope], Awaitable[None]]

FINAL = ("confirmed", "cancelled")
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def shop_ports() -> dict[str, int]:
    return tcc_shop.ports()


@pytest.fixture(scope="module")
def settings(database_url: str, shop_ports: dict[str, int]) -> Settings:
    return settings_for(
        database_url,
        unique_names(),
        participants=tcc_shop.participants_config(shop_ports),
        tcc={"call_timeout": 2.0, "lease": 5.0, "backoff_base": 0.1, "backoff_cap": 0.5},
    )


@pytest.fixture(scope="module")
def service(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The coordinator: one ``serve`` process with its scanners (the TCC driver too),
    shared by the module's tests (started once, not per test): each test's transactions
    are in the tables its ``db`` emptied first, and each waits until they are final."""
    logs = tmp_path_factory.mktemp("coordinator")
    config = write_config(settings, logs / "config.toml", db_pool_size=10)
    try:
        with running(config, logs) as [instance]:
            yield instance.url
    finally:
        asyncio.run(remove_traces(settings))


@pytest.fixture
async def initiator(service: str) -> AsyncIterator[Initiator]:
    async with Initiator(service, PRODUCER) as tcc:
        yield tcc


async def finished(tcc: Initiator, gid: str, within: float = 30.0) -> dict[str, Any]:
    """``gid`` once the coordinator has confirmed or cancelled every branch."""
    state: dict[str, Any] = {}

    async def final() -> bool:
        state.update(await tcc.get(gid))
        return state["status"] in FINAL

    await wait_until(final, within=within, every=0.1)
    return state


def branch_statuses(state: dict[str, Any]) -> dict[str, str]:
    return {b["branch"]: b["status"] for b in state["branches"]}


async def order_status(db: asyncpg.Connection, order_id: int) -> str:
    status: str = await db.fetchval("SELECT status FROM shop_orders WHERE id = $1", order_id)
    return status


async def test_a_paid_order_is_confirmed_at_every_participant_once(
    db: asyncpg.Connection, pool: asyncpg.Pool, shop_ports: dict[str, int], initiator: Initiator
) -> None:
    await tcc_shop.reset(db, stock=100, orders=1)
    async with tcc_shop.serving(pool, shop_ports):
        async with initiator.transaction(timeout=30, wait=True) as tx:
            await tx.try_all(branches(1, qty=2, points=10))
            assert await stock(db) == (98, 2, 0)  # tried: frozen, not sold
            assert await order_status(db, 1) == "UPDATING"
        assert tx.status == "confirmed"
        state = await initiator.get(tx.gid)
    assert set(branch_statuses(state).values()) == {"confirmed"}
    assert len(state["branches"]) == 4
    assert await stock(db) == (98, 0, 2)
    assert await member(db) == (1200, 0)
    assert await order_status(db, 1) == "PAYED"
    assert await db.fetchval("SELECT status FROM shop_delivery WHERE order_id = 1") == "CREATED"
    ran = await effects(db)
    for name in tcc_shop.TOKENS:
        assert ran.get((name, "try")) == 1 and ran.get((name, "confirm")) == 1, name
        assert (name, "cancel") not in ran, name


class HeldTrys:
    """ASGI middleware holding every Try until :attr:`release` is set (its body read
    first, so that the call still reaches the participant after its caller hung up),
    and keeping the status the participant then answered."""

    def __init__(self, app: Any, holding: asyncio.Event) -> None:
        self.app = app
        self.release = asyncio.Event()
        self.holding = holding
        self.answered: list[int] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/try"):
            await self.app(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.holding.set()
        await self.release.wait()

        async def replay() -> Scope:
            return {"type": "http.request", "body": body, "more_body": False}

        async def keep(message: Scope) -> None:
            if message["type"] == "http.response.start":
                self.answered.append(message["status"])
            await send(message)

        await self.app(scope, replay, keep)


class TrysAfter:
    """ASGI middleware letting a Try through once ``holding`` is set."""

    def __init__(self, app: Any, holding: asyncio.Event) -> None:
        self.app = app
        self.holding = holding

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/try"):
            await self.holding.wait()
        await self.app(scope, receive, send)


async def test_a_refused_try_cancels_every_branch_and_the_late_try_is_refused(
    db: asyncpg.Connection, pool: asyncpg.Pool, shop_ports: dict[str, int], initiator: Initiator
) -> None:
    await tcc_shop.reset(db, stock=1, orders=1)  # the order wants 2: inventory refuses
    holding = asyncio.Event()
    held: list[HeldTrys] = []

    def hold_wms(name: str, app: Any) -> Any:
        """wms's Try is held; inventory refuses only once it is (so it is in flight)."""
        if name == "wms":
            held.append(HeldTrys(app, holding))
            return held[0]
        return TrysAfter(app, holding) if name == "inventory" else app

    async with tcc_shop.serving(pool, shop_ports, hold_wms):
        with pytest.raises(TryRefused) as refused:
            async with initiator.transaction(timeout=30) as tx:
                await tx.try_all(branches(1, qty=2))
        assert refused.value.participant == "inventory" and refused.value.branch == "stock-1"
        assert refused.value.answer["code"] == "refused"
        assert held[0].holding.is_set()  # wms's Try was sent, and never reached wms
        state = await finished(initiator, tx.gid)
        assert state["status"] == "cancelled"
        assert set(branch_statuses(state).values()) == {"cancelled"}
        # The Cancels of inventory (refused) and wms (never tried) were empty rollbacks.
        rows = await tcc_shop.barrier(db, tx.gid)
        for never_tried in ("stock-1", "delivery-1"):
            assert {(never_tried, "try", "cancel"), (never_tried, "cancel", "cancel")} <= rows
        held[0].release.set()  # wms's Try arrives now, after its Cancel
        await wait_until(lambda: bool(held[0].answered), within=10)
    assert held[0].answered == [409]
    assert await db.fetchval("SELECT count(*) FROM shop_delivery") == 0
    ran = await effects(db)
    assert ("wms", "try") not in ran and ("wms", "cancel") not in ran
    assert ("inventory", "cancel") not in ran
    assert ran[("order", "cancel")] == 1 and ran[("credit", "cancel")] == 1
    assert await stock(db) == (1, 0, 0)
    assert await member(db) == (tcc_shop.START_POINTS, 0)
    assert await order_status(db, 1) == "CANCELED"


async def test_a_try_without_an_answer_fails_and_cancels_every_branch(
    db: asyncpg.Connection, pool: asyncpg.Pool, shop_ports: dict[str, int], service: str
) -> None:
    await tcc_shop.reset(db, stock=100, orders=1)
    holding = asyncio.Event()
    held: list[HeldTrys] = []

    def hold_wms(name: str, app: Any) -> Any:
        if name != "wms":
            return app
        held.append(HeldTrys(app, holding))
        return held[0]

    async with (
        tcc_shop.serving(pool, shop_ports, hold_wms),
        Initiator(service, PRODUCER, try_timeout=1.0) as impatient,
    ):
        with pytest.raises(TryFailed) as failed:
            async with impatient.transaction(timeout=30) as tx:
                await tx.try_all(branches(1))
        assert (failed.value.participant, failed.value.branch) == ("wms", "delivery-1")
        assert failed.value.http_status is None  # no answer within try_timeout
        state = await finished(impatient, tx.gid)
        assert set(branch_statuses(state).values()) == {"cancelled"}
        held[0].release.set()  # the timed-out Try reaches wms after its Cancel
        await wait_until(lambda: bool(held[0].answered), within=10)
    assert held[0].answered == [409]
    assert await db.fetchval("SELECT count(*) FROM shop_delivery") == 0
    assert await stock(db) == (100, 0, 0)
    assert await order_status(db, 1) == "CANCELED"


async def test_a_failing_try_raises_try_failed_even_when_the_block_catches_it(
    db: asyncpg.Connection, pool: asyncpg.Pool, shop_ports: dict[str, int], initiator: Initiator
) -> None:
    await tcc_shop.reset(db, stock=100, orders=1)
    gid = "fails-1"
    await db.execute("INSERT INTO shop_delivery VALUES ($1, 1, 'CREATED')", gid)  # wms: 500
    caught: list[TryFailed] = []
    async with tcc_shop.serving(pool, shop_ports):
        with pytest.raises(TryFailed) as failed:
            async with initiator.transaction(gid, timeout=30) as tx:
                await tx.branch("inventory", "stock-1", {"qty": 2})
                try:
                    await tx.branch("wms", "delivery-1", {"order_id": 1})
                except TryFailed as exc:
                    caught.append(exc)  # and carries on as if nothing happened
        assert failed.value is caught[0]
        assert failed.value.http_status == 500 and failed.value.answer["code"] == "internal"
        state = await finished(initiator, gid)
    assert state["status"] == "cancelled"
    assert await stock(db) == (100, 0, 0)
    assert await db.fetchval("SELECT status FROM shop_delivery WHERE gid = $1", gid) == "CREATED"


ORDERS = 200
STOCK = 100


async def test_concurrent_orders_never_oversell_and_all_end(
    db: asyncpg.Connection, pool: asyncpg.Pool, shop_ports: dict[str, int], service: str
) -> None:
    await tcc_shop.reset(db, stock=STOCK, orders=ORDERS)
    # 800 Trys at once, every inventory Try on the one stock row, all served in this test's
    # loop: on a loaded machine one of them can wait past the default 10 s, and this test
    # is about overselling, not about time.
    async with Initiator(service, PRODUCER, try_timeout=60.0) as initiator:
        states, paid = await _pay_all(initiator, pool, shop_ports)
    confirmed = [s["gid"] for s in states if s["status"] == "confirmed"]
    assert sorted(confirmed) == sorted(g for g in paid if g is not None)
    assert len(confirmed) == STOCK  # only inventory refuses, and only once it is out
    available, frozen, sold = await stock(db)
    assert (available, frozen, sold) == (0, 0, STOCK)
    assert available + frozen + sold == STOCK
    assert await member(db) == (tcc_shop.START_POINTS + 10 * STOCK, 0)
    rows = await db.fetch("SELECT status, count(*) AS n FROM shop_orders GROUP BY status")
    statuses = {r["status"]: r["n"] for r in rows}
    # An order whose Try was stopped in flight (inventory refused first) never changed.
    assert statuses["PAYED"] == STOCK and set(statuses) <= {"PAYED", "CANCELED", "CREATED"}
    rows = await db.fetch("SELECT status, count(*) AS n FROM shop_delivery GROUP BY status")
    assert {r["status"]: r["n"] for r in rows}.get("CREATED") == STOCK
    assert "UNKNOWN" not in {r["status"] for r in rows}
    ran = await effects(db)
    for name in tcc_shop.TOKENS:
        assert ran[(name, "confirm")] == STOCK, name


async def _pay_all(
    initiator: Initiator, pool: asyncpg.Pool, shop_ports: dict[str, int]
) -> tuple[list[dict[str, Any]], list[str | None]]:
    """Every order paid at once; each one's final state, and the gids committed."""

    async def pay(order_id: int) -> str | None:
        """The order's gid once committed; None when refused (out of stock)."""
        try:
            async with initiator.transaction(f"pay-{order_id}", timeout=120) as tx:
                await tx.try_all(branches(order_id, qty=1, points=10))
        except TryRefused as exc:
            assert exc.participant == "inventory", exc
            return None
        return tx.gid

    async with tcc_shop.serving(pool, shop_ports):
        paid = await asyncio.gather(*(pay(i) for i in range(1, ORDERS + 1)))
        states = [await finished(initiator, f"pay-{i}", within=120) for i in range(1, ORDERS + 1)]
    return states, paid


async def test_a_killed_initiator_is_cancelled_at_its_deadline(
    db: asyncpg.Connection,
    pool: asyncpg.Pool,
    shop_ports: dict[str, int],
    service: str,
    initiator: Initiator,
) -> None:
    await tcc_shop.reset(db, stock=100, orders=1)
    gid = "killed-1"
    async with tcc_shop.serving(pool, shop_ports):
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.helpers.tcc_initiator",
            gid,
            "1",
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "SERVICE": service, "TOKEN": PRODUCER, "TIMEOUT": "3"},
        )
        try:
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), 60)
            assert line == b"tried\n", line
            assert await stock(db) == (98, 2, 0)
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGKILL)
            await process.wait()
        state = await finished(initiator, gid)
    assert state["status"] == "cancelled"
    assert set(branch_statuses(state).values()) == {"cancelled"}
    assert "expire" in [e["op"] for e in state["events"]]
    assert await stock(db) == (100, 0, 0)
    assert await member(db) == (tcc_shop.START_POINTS, 0)
    assert await order_status(db, 1) == "CANCELED"
    assert await db.fetchval("SELECT status FROM shop_delivery WHERE order_id = 1") == "CANCELED"
    ran = await effects(db)
    for name in tcc_shop.TOKENS:
        assert ran.get((name, "try")) == 1 and ran.get((name, "cancel")) == 1, name


def readme_examples() -> tuple[str, str]:
    """The initiator's and the participant's examples of the README's TCC section."""
    section = README.read_text().split("\n## TCC\n", 1)[1].split("\n## ", 1)[0]
    initiator, participant = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    return initiator, participant


async def run_example(code: str, names: dict[str, Any]) -> None:
    """Run ``code`` as written (top-level awaits included) with ``names`` defined."""
    compiled = compile(code, "README.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    running = eval(compiled, names)
    if running is not None:
        await running


async def test_the_readme_examples_run(
    db: asyncpg.Connection,
    pool: asyncpg.Pool,
    shop_ports: dict[str, int],
    service: str,
    initiator: Initiator,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await tcc_shop.reset(db, stock=100, orders=0)
    await db.execute(
        "CREATE TABLE IF NOT EXISTS orders (id int PRIMARY KEY, status text NOT NULL);"
        " DELETE FROM orders; INSERT INTO orders VALUES (7, 'CREATED')"
    )
    initiating, participating = readme_examples()
    order_app = FastAPI()
    order = {"pool": pool, "ORDER_TCC_TOKEN": tcc_shop.TOKENS["order"], "app": order_app}
    await run_example(participating, order)
    others = [name for name in tcc_shop.TOKENS if name != "order"]
    async with (
        serving_app(order_app, shop_ports["order"]),
        tcc_shop.serving(pool, shop_ports, only=others),
    ):
        paying: dict[str, Any] = {"SERVICE_URL": service, "ORDER_TOKEN": PRODUCER}
        gids = []
        for _ in range(2):  # pays order 7; then order 7 is not payable any more
            try:
                await run_example(initiating, paying)
            finally:
                if "tcc" in paying:
                    await paying.pop("tcc").close()
            gids.append(paying["tx"].gid)
        first, second = gids
        assert (await finished(initiator, first))["status"] == "confirmed"
        assert (await finished(initiator, second))["status"] == "cancelled"
    assert capsys.readouterr().out == "not paid: order not payable\n"
    assert await db.fetchval("SELECT status FROM orders WHERE id = 7") == "PAYED"
    assert await stock(db) == (98, 0, 2)
    assert await member(db) == (tcc_shop.START_POINTS + 10, 0)
