"""The TCC demo's two timed faults wait on their condition, not on a guess of the timing:
wms's held-back Try is refused even when its Cancel comes later than the old 3 s hold,
and credit's slow Confirm does not finish before the demo releases it (after killing
its coordinator), however late that is. Real participant apps over a database of this
test run; the lateness stands for a loaded machine."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import asyncpg
import httpx
import pytest

from demo import books as message_books
from demo.books import POINTS
from demo.tcc import books
from demo.tcc.phase import DELAY
from demo.tcc.shop import Faults, create_app, gid, marker
from reliable_msg.tcc import BRANCH_HEADER, GID_HEADER, OP_HEADER, Op, proof
from tests.conftest import SERVER_URL

TOKEN = "tcc-faults-token"
#: Later than the 3 s the demo's faults used to wait before going on regardless.
LATE = 3.5


@pytest.fixture
async def pools() -> AsyncIterator[dict[str, asyncpg.Pool]]:
    dsn = f"{SERVER_URL}/rmsg_test_{os.getpid()}_tccfaults"
    await books.reset(dsn, 2)
    made: dict[str, asyncpg.Pool] = {}
    try:
        for name in ("credit", "wms"):
            made[name] = await asyncpg.create_pool(
                dsn, min_size=1, max_size=4, server_settings={"search_path": books.SCHEMAS[name]}
            )
        yield made
    finally:
        for pool in made.values():
            await pool.close()
        await message_books.drop_database(dsn)


async def call(
    client: httpx.AsyncClient, name: str, branch: str, op: Op, payload: Mapping[str, object]
) -> httpx.Response:
    order_id = int(branch.rpartition("-")[2])
    g = gid(order_id)
    headers = {
        GID_HEADER: g,
        BRANCH_HEADER: branch,
        OP_HEADER: op.value,
        "Authorization": f"Bearer {proof(TOKEN, g, branch, op)}",
    }
    body = {"gid": g, "branch": branch, "op": op.value, "payload": payload}
    return await client.post(f"/tcc/{name}/{op.value}", headers=headers, content=json.dumps(body))


def client(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://demo")  # type: ignore[arg-type]


async def test_late_try_and_slow_confirm_wait_on_their_condition(
    pools: dict[str, asyncpg.Pool], tmp_path: Path
) -> None:
    faults = Faults(frozenset(), frozenset({2}), frozenset({1}), DELAY, tmp_path)
    goods = {"order_id": 1, "sku": books.sku(1), "qty": 2}
    points = {"member_id": 2, "points": books.CREDIT}
    async with (
        client(create_app("wms", pools["wms"], TOKEN, faults)) as wms,
        client(create_app("credit", pools["credit"], TOKEN, faults)) as credit,
    ):
        late_try = asyncio.create_task(call(wms, "wms", "delivery-1", Op.TRY, goods))
        assert (await call(credit, "credit", "points-2", Op.TRY, points)).status_code == 200
        slow_confirm = asyncio.create_task(call(credit, "credit", "points-2", Op.CONFIRM, points))
        await asyncio.sleep(LATE)  # a loaded machine: the Cancel and the kill come late

        assert not slow_confirm.done(), "the Confirm finished before it was released"
        cancel = await call(wms, "wms", "delivery-1", Op.CANCEL, goods)
        assert cancel.status_code == 200, cancel.text  # an empty rollback
        (tmp_path / marker("credit", "release", 2)).touch()

        late = await late_try
        assert late.status_code == 409, late.text
        assert "cancelled_before_try" in late.text
        assert (await slow_confirm).status_code == 200
    deliveries = await pools["wms"].fetchval("SELECT count(*) FROM sale_delivery_orders")
    assert deliveries == 0  # the late Try left nothing
    member = await pools["credit"].fetchrow("SELECT * FROM members WHERE id = 2")
    assert member is not None
    assert (member["points"], member["prepare_add_credit"]) == (POINTS + books.CREDIT, 0)
    recorded = (tmp_path / marker("wms", "late-try", 1)).read_text()
    assert recorded.startswith("409") and "cancelled_before_try" in recorded
