"""The TCC coordinator's HTTP API (``/v1/tcc/``) over the real PostgreSQL: the initiator's
begin, register, commit and cancel with their repeats, the admin's list and retry now,
every refusal as a JSON error that changed nothing, the deadline on the database's
clock, and a commit racing a cancel.

The module's tests share one started service (``shared``; starting one per test was most
of this module's time) and run in the module's event loop. Each test still gets what a
service of its own gave it: tables emptied first (``db``), the service's own coordinator
(a test's replacement is put back after it), and no driver round of another test under
way (the driver is stopped after each test, as a service of its own was, and started
again).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio

from reliable_msg.errors import ConfigError
from reliable_msg.logs import JsonFormatter
from reliable_msg.service.api import create_app
from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from reliable_msg.service.tcc.usecases import Coordinator
from reliable_msg.tcc import Op, proof
from tests.conftest import (
    ADMIN,
    GROUP_TOKENS,
    OTHER_PRODUCER,
    PRODUCER,
    auth,
    emptied_db,
    settings_for,
    started_runtime,
    unique_names,
)
from tests.helpers.tcc_api import (
    MAX_BRANCHES,
    MAX_PAYLOAD,
    MAX_TIMEOUT,
    PARTICIPANTS,
    empty_tcc_tables,
    snapshot,
    tcc_settings,
)
from tests.test_api_errors import assert_error

pytestmark = pytest.mark.asyncio(loop_scope="module")

TX = "/v1/tcc/transactions"
INVENTORY_TRY = "http://127.0.0.1:9/tcc/inventory/try"
CREDIT_TRY = "http://127.0.0.1:9/tcc/credit/try"


@pytest.fixture(scope="module")
def settings(database_url: str) -> Settings:
    return tcc_settings(functools.partial(settings_for, database_url, unique_names()))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared(settings: Settings) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient]]:
    """The module's one started service, and a client of its API."""
    async with started_runtime(settings) as rt:
        transport = httpx.ASGITransport(app=create_app(rt))
        async with httpx.AsyncClient(transport=transport, base_url="http://rmsg") as c:
            yield rt, c


@pytest_asyncio.fixture(loop_scope="module")
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """The test database with its tables emptied first, in the module's event loop."""
    async with emptied_db(database_url) as conn:
        yield conn


@pytest_asyncio.fixture(loop_scope="module")
async def runtime(
    shared: tuple[Runtime, httpx.AsyncClient], db: asyncpg.Connection
) -> AsyncIterator[Runtime]:
    """The shared service, as this test's own: on emptied tables; after the test its own
    coordinator back and its driver stopped (rounds under way end or are cancelled, as
    at a service's stop) and started again."""
    rt = shared[0]
    coordinator = rt.coordinator
    try:
        yield rt
    finally:
        rt.coordinator = coordinator
        await rt.tcc_driver.stop()
        await rt.tcc_driver.start()


@pytest.fixture
def client(shared: tuple[Runtime, httpx.AsyncClient], runtime: Runtime) -> httpx.AsyncClient:
    return shared[1]


@pytest_asyncio.fixture(loop_scope="module")
async def tcc_db(db: asyncpg.Connection) -> asyncpg.Connection:
    await empty_tcc_tables(db)
    return db


@pytest.fixture
def kicked(runtime: Runtime) -> list[str]:
    """The gids the coordinator asked the driver to start on, in order."""
    gids: list[str] = []
    runtime.coordinator = Coordinator(runtime.settings, runtime.tcc_store, kick=gids.append)
    return gids


async def send(
    client: httpx.AsyncClient, method: str, path: str, token: str | None, body: Any = None
) -> httpx.Response:
    headers = auth(token) if token is not None else {}
    content = None
    if body is not None:
        content = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    return await client.request(method, path, content=content, headers=headers)


async def begin(
    client: httpx.AsyncClient, gid: str, seconds: float = 30, token: str = PRODUCER
) -> dict[str, Any]:
    r = await send(client, "POST", TX, token, {"gid": gid, "timeout": seconds})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def branch(id: str, participant: str = "inventory", payload: Any = None) -> dict[str, Any]:
    return {"branch": id, "participant": participant, "payload": payload}


async def register(
    client: httpx.AsyncClient, gid: str, *branches: dict[str, Any], token: str = PRODUCER
) -> dict[str, Any]:
    r = await send(client, "POST", f"{TX}/{gid}/branches", token, {"branches": list(branches)})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def move(client: httpx.AsyncClient, gid: str, action: str, token: str = PRODUCER) -> Any:
    r = await send(client, "POST", f"{TX}/{gid}/{action}", token)
    assert r.status_code == 200, r.text
    return r.json()


def ops(tx: dict[str, Any]) -> list[tuple[str | None, str, str]]:
    return [(e["branch"], e["op"], e["outcome"]) for e in tx["events"]]


# -- happy paths ---------------------------------------------------------------------------


async def test_begin_register_commit_and_their_repeats(
    client: httpx.AsyncClient, tcc_db: asyncpg.Connection, kicked: list[str]
) -> None:
    tx = await begin(client, "order-1001", seconds=12.5)
    assert (tx["gid"], tx["initiator"], tx["status"], tx["timeout"]) == (
        "order-1001",
        "order",
        "trying",
        12.5,
    )
    assert tx["branches"] == [] and ops(tx) == [(None, "begin", "ok")]
    assert tx["finished_at"] is None and tx["attempts"] == 0 and tx["stalled"] is False
    deadline_late = await tcc_db.fetchval(
        "SELECT deadline - created_at = interval '12.5 s' FROM rmsg_tcc_transaction"
    )
    assert deadline_late

    again = await send(client, "POST", TX, PRODUCER, {"gid": "order-1001", "timeout": 12.5})
    assert again.status_code == 200 and again.json() == tx

    calls = [
        branch("stock", "inventory", {"sku": "A-1", "count": 2}),
        branch("points", "credit", {"member": 7, "add": 10}),
    ]
    answer = await register(client, "order-1001", *calls)
    assert answer == {
        "gid": "order-1001",
        "branches": [
            {
                "branch": "stock",
                "participant": "inventory",
                "try_url": INVENTORY_TRY,
                "proof": proof(PARTICIPANTS["inventory"][1], "order-1001", "stock", Op.TRY),
            },
            {
                "branch": "points",
                "participant": "credit",
                "try_url": CREDIT_TRY,
                "proof": proof(PARTICIPANTS["credit"][1], "order-1001", "points", Op.TRY),
            },
        ],
    }
    before = await snapshot(tcc_db)
    assert await register(client, "order-1001", *calls) == answer
    assert await register(client, "order-1001", calls[1]) == {
        "gid": "order-1001",
        "branches": answer["branches"][1:],
    }
    assert await snapshot(tcc_db) == before
    assert kicked == []

    committed = await move(client, "order-1001", "commit")
    assert committed["status"] == "confirming" and committed["finished_at"] is None
    assert [(b["branch"], b["status"]) for b in committed["branches"]] == [
        ("points", "registered"),
        ("stock", "registered"),
    ]
    assert ops(committed) == [
        (None, "begin", "ok"),
        ("stock", "register", "ok"),
        ("points", "register", "ok"),
        (None, "commit", "ok"),
    ]
    assert kicked == ["order-1001"]
    repeat = await move(client, "order-1001", "commit")
    assert repeat == committed and kicked == ["order-1001"]

    for token in (PRODUCER, ADMIN):
        r = await send(client, "GET", f"{TX}/order-1001", token)
        assert r.status_code == 200 and r.json() == committed


async def test_a_commit_without_branches_is_confirmed_at_once(
    client: httpx.AsyncClient, tcc_db: asyncpg.Connection, kicked: list[str]
) -> None:
    await begin(client, "empty-1")
    tx = await move(client, "empty-1", "commit")
    assert tx["status"] == "confirmed" and tx["finished_at"] is not None
    assert [e["op"] for e in tx["events"]] == ["begin", "commit", "confirmed"]
    assert await move(client, "empty-1", "commit") == tx
    assert kicked == []  # nothing left to call


async def test_cancel_and_its_repeat(
    client: httpx.AsyncClient, tcc_db: asyncpg.Connection, kicked: list[str]
) -> None:
    await begin(client, "c-1")
    await register(client, "c-1", branch("stock"))
    tx = await move(client, "c-1", "cancel")
    assert tx["status"] == "cancelling"
    assert [e["op"] for e in tx["events"]] == ["begin", "register", "cancel"]
    assert await move(client, "c-1", "cancel") == tx
    assert kicked == ["c-1"]

    await begin(client, "c-2")
    empty = await move(client, "c-2", "cancel")
    assert empty["status"] == "cancelled" and empty["finished_at"] is not None
    assert [e["op"] for e in empty["events"]] == ["begin", "cancel", "cancelled"]


async def test_the_admin_lists_newest_first_with_filters_and_a_cursor(
    client: httpx.AsyncClient, tcc_db: asyncpg.Connection, kicked: list[str]
) -> None:
    for gid in ("l-1", "l-2", "l-3"):
        await begin(client, gid)
    await begin(client, "l-4", token=OTHER_PRODUCER)
    await register(client, "l-2", branch("b", "credit"))
    await move(client, "l-2", "commit")
    await move(client, "l-3", "cancel")
    # l-2 committed long ago: stalled
    await tcc_db.execute(
        "UPDATE rmsg_tcc_transaction SET created_at = created_at - interval '2 h',"
        " updated_at = now() - interval '1 h' WHERE gid = 'l-2'"
    )

    async def listed(query: str = "") -> list[str]:
        r = await send(client, "GET", f"{TX}{query}", ADMIN)
        assert r.status_code == 200, r.text
        for item in r.json()["items"]:
            assert "branches" not in item and "events" not in item
        return [item["gid"] for item in r.json()["items"]]

    assert await listed() == ["l-4", "l-3", "l-1", "l-2"]
    assert await listed("?status=trying") == ["l-4", "l-1"]
    assert await listed("?initiator=other") == ["l-4"]
    assert await listed("?participant=credit") == ["l-2"]
    assert await listed("?stalled=true") == ["l-2"]
    assert await listed("?stalled=false&initiator=order") == ["l-3", "l-1"]

    seen, cursor = [], None
    while True:
        query = f"?limit=1&cursor={cursor}" if cursor else "?limit=1"
        r = await send(client, "GET", f"{TX}{query}", ADMIN)
        page = r.json()
        seen += [item["gid"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ["l-4", "l-3", "l-1", "l-2"]


async def test_retry_now_resets_the_waits_and_kicks_the_driver(
    client: httpx.AsyncClient, tcc_db: asyncpg.Connection, kicked: list[str]
) -> None:
    await begin(client, "r-1")
    await register(client, "r-1", branch("a"), branch("b", "credit"))
    await move(client, "r-1", "commit")
    await tcc_db.execute(
        "UPDATE rmsg_tcc_transaction SET next_try_at = now() + interval '5 min', attempts = 3"
        " WHERE gid = 'r-1';"
        "UPDATE rmsg_tcc_branch SET next_try_at = now() + interval '5 min', attempts = 3;"
        "UPDATE rmsg_tcc_branch SET status = 'confirmed' WHERE branch = 'b'"
    )
    kicked.clear()
    tx = await move(client, "r-1", "retry", ADMIN)
    assert tx["status"] == "confirming" and tx["next_try_at"] is None and tx["attempts"] == 3
    waits = {b["branch"]: b["next_try_at"] for b in tx["branches"]}
    assert waits["a"] is None and waits["b"] is not None  # a finished branch is left alone
    assert tx["events"][-1]["op"] == "retry"
    assert kicked == ["r-1"]


# -- refusals: a clear JSON error, and nothing changed -------------------------------------


@pytest_asyncio.fixture(loop_scope="module")
async def seeded(client: httpx.AsyncClient, tcc_db: asyncpg.Connection, kicked: list[str]) -> None:
    """``t-1`` trying with branch ``stock``; ``t-ok`` committed; ``t-no`` cancelled;
    ``t-other`` trying, begun by the other producer; ``t-done`` confirmed (no branch).
    The driver is not kicked (``kicked`` is emptied after): it would call ``t-ok``'s and
    ``t-no``'s branches in the background, and change their rows under the test."""
    await begin(client, "t-1")
    await register(client, "t-1", branch("stock", payload={"n": 1}))
    await begin(client, "t-ok")
    await register(client, "t-ok", branch("stock"))
    await move(client, "t-ok", "commit")
    await begin(client, "t-no")
    await register(client, "t-no", branch("stock"))
    await move(client, "t-no", "cancel")
    await begin(client, "t-other", token=OTHER_PRODUCER)
    await begin(client, "t-done")
    await move(client, "t-done", "commit")
    kicked.clear()


def _begin(gid: Any = "new-1", timeout: Any = 30, **more: Any) -> dict[str, Any]:
    return {"gid": gid, "timeout": timeout, **more}


def _branches(*items: dict[str, Any]) -> dict[str, Any]:
    return {"branches": list(items)}


GROUP = GROUP_TOKENS["inventory"]
BIG = "x" * MAX_PAYLOAD  # over the limit once quoted

REFUSALS = [
    # unknown gid
    ("POST", f"{TX}/nope/commit", PRODUCER, None, 404, "not_found"),
    ("POST", f"{TX}/nope/cancel", PRODUCER, None, 404, "not_found"),
    ("POST", f"{TX}/nope/branches", PRODUCER, _branches(branch("a")), 404, "not_found"),
    ("GET", f"{TX}/nope", PRODUCER, None, 404, "not_found"),
    ("GET", f"{TX}/nope", ADMIN, None, 404, "not_found"),
    ("POST", f"{TX}/nope/retry", ADMIN, None, 404, "not_found"),
    # moves the state machine forbids
    ("POST", f"{TX}/t-no/commit", PRODUCER, None, 409, "rolled_back"),
    ("POST", f"{TX}/t-ok/cancel", PRODUCER, None, 409, "committed"),
    ("POST", f"{TX}/t-ok/branches", PRODUCER, _branches(branch("more")), 409, "not_trying"),
    ("POST", f"{TX}/t-no/branches", PRODUCER, _branches(branch("stock")), 409, "not_trying"),
    ("POST", f"{TX}/t-1/retry", ADMIN, None, 409, "conflict"),
    ("POST", f"{TX}/t-done/retry", ADMIN, None, 409, "conflict"),
    ("POST", f"{TX}/t-done/cancel", PRODUCER, None, 409, "committed"),
    # wrong role or another producer's transaction
    ("POST", TX, GROUP, _begin(), 403, "forbidden"),
    ("POST", TX, ADMIN, _begin(), 403, "forbidden"),
    ("POST", f"{TX}/t-1/commit", ADMIN, None, 403, "forbidden"),
    ("POST", f"{TX}/t-1/cancel", GROUP, None, 403, "forbidden"),
    ("POST", f"{TX}/t-1/branches", ADMIN, _branches(branch("a")), 403, "forbidden"),
    ("GET", f"{TX}/t-1", GROUP, None, 403, "forbidden"),
    ("GET", TX, PRODUCER, None, 403, "forbidden"),
    ("POST", f"{TX}/t-ok/retry", PRODUCER, None, 403, "forbidden"),
    ("POST", f"{TX}/t-1/commit", None, None, 401, "unauthorized"),
    ("POST", f"{TX}/t-1/commit", OTHER_PRODUCER, None, 404, "not_found"),
    ("POST", f"{TX}/t-1/cancel", OTHER_PRODUCER, None, 404, "not_found"),
    ("POST", f"{TX}/t-1/branches", OTHER_PRODUCER, _branches(branch("a")), 404, "not_found"),
    ("GET", f"{TX}/t-1", OTHER_PRODUCER, None, 404, "not_found"),
    ("POST", TX, OTHER_PRODUCER, _begin("t-1"), 409, "id_conflict"),
    ("POST", TX, PRODUCER, _begin("t-1", 31), 409, "id_conflict"),
    # branches
    (
        "POST",
        f"{TX}/t-1/branches",
        PRODUCER,
        _branches(branch("a", "wms")),
        422,
        "unknown_participant",
    ),
    (
        "POST",
        f"{TX}/t-1/branches",
        PRODUCER,
        _branches(*[branch(f"b{i}") for i in range(MAX_BRANCHES + 1)]),
        422,
        "too_many_branches",
    ),
    (
        "POST",
        f"{TX}/t-1/branches",
        PRODUCER,
        _branches(*[branch(f"b{i}") for i in range(MAX_BRANCHES)]),
        422,
        "too_many_branches",
    ),
    (
        "POST",
        f"{TX}/t-1/branches",
        PRODUCER,
        _branches(branch("a"), branch("a", "credit")),
        422,
        "duplicate_id",
    ),
    (
        "POST",
        f"{TX}/t-1/branches",
        PRODUCER,
        _branches(branch("stock", payload={"n": 2})),
        409,
        "id_conflict",
    ),
    (
        "POST",
        f"{TX}/t-1/branches",
        PRODUCER,
        _branches(branch("new"), branch("stock", "credit", {"n": 1})),
        409,
        "id_conflict",
    ),
    (
        "POST",
        f"{TX}/t-1/branches",
        PRODUCER,
        _branches(branch("a", payload=BIG)),
        413,
        "payload_too_large",
    ),
    (
        "POST",
        f"{TX}/t-1/branches",
        PRODUCER,
        _branches(branch("a", payload="\u0000")),
        422,
        "invalid_request",
    ),
    ("POST", f"{TX}/t-1/branches", PRODUCER, _branches(), 422, "invalid_request"),
    ("POST", f"{TX}/t-1/branches", PRODUCER, _branches(branch("a b")), 422, "invalid_request"),
    ("POST", f"{TX}/t-1/branches", PRODUCER, _branches(branch("b" * 129)), 422, "invalid_request"),
    (
        "POST",
        f"{TX}/t-1/branches",
        PRODUCER,
        _branches({**branch("a"), "url": "http://x"}),
        422,
        "invalid_request",
    ),
    # begin: timeout and gid
    ("POST", TX, PRODUCER, _begin(timeout=0), 422, "invalid_request"),
    ("POST", TX, PRODUCER, _begin(timeout=-1), 422, "invalid_request"),
    ("POST", TX, PRODUCER, _begin(timeout=1e-9), 422, "invalid_request"),
    ("POST", TX, PRODUCER, _begin(timeout=MAX_TIMEOUT + 0.5), 422, "invalid_request"),
    ("POST", TX, PRODUCER, _begin(timeout="30"), 422, "invalid_request"),
    ("POST", TX, PRODUCER, _begin(timeout=True), 422, "invalid_request"),
    ("POST", TX, PRODUCER, _begin(timeout=None), 422, "invalid_request"),
    ("POST", TX, PRODUCER, {"gid": "new-1"}, 422, "invalid_request"),
    ("POST", TX, PRODUCER, _begin("bad gid"), 422, "invalid_request"),
    ("POST", TX, PRODUCER, _begin("bad/gid"), 422, "invalid_request"),
    ("POST", TX, PRODUCER, _begin("é"), 422, "invalid_request"),
    ("POST", TX, PRODUCER, _begin(""), 422, "invalid_request"),
    ("POST", TX, PRODUCER, _begin(".."), 422, "invalid_request"),
    ("POST", TX, PRODUCER, _begin("g" * 129), 422, "invalid_request"),
    ("POST", TX, PRODUCER, _begin(7), 422, "invalid_request"),
    ("POST", TX, PRODUCER, _begin(extra=1), 422, "invalid_request"),
    ("POST", f"{TX}/{'g' * 129}/commit", PRODUCER, None, 422, "invalid_request"),
    # the admin's list
    ("GET", f"{TX}?stalled=1", ADMIN, None, 422, "invalid_request"),
    ("GET", f"{TX}?stalled=yes", ADMIN, None, 422, "invalid_request"),
    ("GET", f"{TX}?status=done", ADMIN, None, 422, "invalid_request"),
    ("GET", f"{TX}?limit=0", ADMIN, None, 422, "invalid_request"),
    ("GET", f"{TX}?limit=501", ADMIN, None, 422, "invalid_request"),
    ("GET", f"{TX}?participant=Bad%20Name", ADMIN, None, 422, "invalid_request"),
    ("GET", f"{TX}?cursor=abc", ADMIN, None, 400, "bad_cursor"),
]


@pytest.mark.parametrize(
    ("method", "path", "token", "body", "status", "code"),
    REFUSALS,
    ids=[f"{i}-{r[0]}-{r[1].removeprefix(TX)}-{r[5]}" for i, r in enumerate(REFUSALS)],
)
async def test_every_refusal_is_a_json_error_and_changes_nothing(
    client: httpx.AsyncClient,
    tcc_db: asyncpg.Connection,
    seeded: None,
    kicked: list[str],
    method: str,
    path: str,
    token: str | None,
    body: Any,
    status: int,
    code: str,
) -> None:
    before = await snapshot(tcc_db)
    r = await send(client, method, path, token, body)
    assert_error(r, status, code)
    assert await snapshot(tcc_db) == before
    assert kicked == []


async def test_a_body_with_nan_is_refused(
    client: httpx.AsyncClient, tcc_db: asyncpg.Connection
) -> None:
    raw = b'{"gid": "n-1", "timeout": NaN}'
    r = await client.post(
        TX, content=raw, headers={**auth(PRODUCER), "Content-Type": "application/json"}
    )
    assert_error(r, 422, "invalid_request")
    assert await snapshot(tcc_db) == []


# -- the deadline, on the database's clock ------------------------------------------------


async def test_a_commit_past_the_deadline_is_refused_and_the_transaction_cancelled(
    client: httpx.AsyncClient, tcc_db: asyncpg.Connection, kicked: list[str]
) -> None:
    await begin(client, "late-1", seconds=30)
    await register(client, "late-1", branch("stock"))
    # past the deadline (not a short timeout: on a loaded machine the registration came
    # after it, and was refused)
    await tcc_db.execute(
        "UPDATE rmsg_tcc_transaction SET created_at = now() - interval '1 min',"
        " deadline = now() - interval '1 s' WHERE gid = 'late-1'"
    )
    r = await send(client, "POST", f"{TX}/late-1/commit", PRODUCER)
    assert_error(r, 409, "expired")
    tx = (await send(client, "GET", f"{TX}/late-1", PRODUCER)).json()
    assert tx["status"] == "cancelling"
    assert [e["op"] for e in tx["events"]] == ["begin", "register", "expire"]
    assert kicked == ["late-1"]
    # and it stays refused, as expired: the initiator's commit never wins after an expiry
    assert_error(await send(client, "POST", f"{TX}/late-1/commit", PRODUCER), 409, "expired")
    assert (await move(client, "late-1", "cancel"))["status"] == "cancelling"


async def test_a_commit_after_the_scanner_expired_it_answers_expired_not_rolled_back(
    runtime: Runtime, client: httpx.AsyncClient, tcc_db: asyncpg.Connection, kicked: list[str]
) -> None:
    """The initiator learns why: cancelled by its deadline (an ``expire`` event), not by a
    cancel; a transaction the initiator cancelled still answers ``rolled_back``."""
    for gid in ("late-3", "late-4"):
        await begin(client, gid, seconds=30)
        await register(client, gid, branch("stock"))
    await move(client, "late-4", "cancel")
    await tcc_db.execute(
        "UPDATE rmsg_tcc_transaction SET created_at = now() - interval '1 min',"
        " deadline = now() - interval '1 s' WHERE gid = 'late-3'"
    )
    await runtime.tcc_driver.run_once()  # the deadline scanner (the branch's call fails)
    assert await tcc_db.fetchval(
        "SELECT status FROM rmsg_tcc_transaction WHERE gid = 'late-3'"
    ) in ("cancelling", "cancelled")
    before = await snapshot(tcc_db)
    r = await send(client, "POST", f"{TX}/late-3/commit", PRODUCER)
    assert_error(r, 409, "expired")
    assert_error(await send(client, "POST", f"{TX}/late-4/commit", PRODUCER), 409, "rolled_back")
    assert await snapshot(tcc_db) == before


async def test_a_registration_past_the_deadline_expires_the_transaction(
    client: httpx.AsyncClient, tcc_db: asyncpg.Connection, kicked: list[str]
) -> None:
    await begin(client, "late-2", seconds=30)
    await tcc_db.execute(
        "UPDATE rmsg_tcc_transaction SET created_at = now() - interval '1 min',"
        " deadline = now() - interval '1 s' WHERE gid = 'late-2'"
    )
    r = await send(client, "POST", f"{TX}/late-2/branches", PRODUCER, _branches(branch("a")))
    assert_error(r, 409, "expired")
    tx = (await send(client, "GET", f"{TX}/late-2", PRODUCER)).json()
    # no branch to cancel: cancelled at once, nothing left for the driver
    assert tx["status"] == "cancelled" and tx["branches"] == []
    assert [e["op"] for e in tx["events"]] == ["begin", "expire", "cancelled"]
    assert kicked == []


# -- concurrency --------------------------------------------------------------------------


async def test_a_commit_racing_a_cancel_exactly_one_wins(
    client: httpx.AsyncClient, tcc_db: asyncpg.Connection, kicked: list[str]
) -> None:
    for i in range(20):
        gid = f"race-{i}"
        await begin(client, gid)
        await register(client, gid, branch("a"), branch("b", "credit"))
        commit, cancel = await asyncio.gather(
            send(client, "POST", f"{TX}/{gid}/commit", PRODUCER),
            send(client, "POST", f"{TX}/{gid}/cancel", PRODUCER),
        )
        assert sorted([commit.status_code, cancel.status_code]) == [200, 409], (
            commit.text,
            cancel.text,
        )
        status = await tcc_db.fetchval(
            "SELECT status FROM rmsg_tcc_transaction WHERE gid = $1", gid
        )
        if commit.status_code == 200:
            assert status == "confirming" and cancel.json()["error"]["code"] == "committed"
        else:
            assert status == "cancelling" and commit.json()["error"]["code"] == "rolled_back"
        # The moves only (branch NULL): the kicked driver's Cancel calls are events too.
        moves = await tcc_db.fetch(
            "SELECT op FROM rmsg_tcc_event"
            " WHERE gid = $1 AND op IN ('commit', 'cancel') AND branch IS NULL",
            gid,
        )
        assert len(moves) == 1
    assert len(kicked) == 20


# -- URLs come from the configuration only -------------------------------------------------


async def test_the_configuration_refuses_a_participant_without_a_url(
    make_settings: Callable[..., Settings],
) -> None:
    # async only because every test of the module is marked to run in its event loop
    with pytest.raises(ConfigError, match=r"participants\.inventory\.url"):
        make_settings(participants={"inventory": {"token": "inventory-participant-token"}})


HOSTILE_PARTICIPANTS = [
    "http://127.0.0.1:6666/evil",
    "//127.0.0.1:6666",
    "inventory/../evil",
    "inventory?url=http://evil",
    "inventory#x",
    "INVENTORY",
    " inventory",
    "inventory\u0000",
    "",
]


async def test_no_request_makes_the_coordinator_answer_a_url_not_configured(
    client: httpx.AsyncClient, tcc_db: asyncpg.Connection
) -> None:
    configured = {INVENTORY_TRY, CREDIT_TRY}
    evil = {"url": "http://127.0.0.1:6666/evil", "try_url": "http://127.0.0.1:6666/try"}
    await begin(client, "http:..127.0.0.1:6666")
    answers = []
    for name in HOSTILE_PARTICIPANTS:
        r = await send(
            client,
            "POST",
            f"{TX}/http:..127.0.0.1:6666/branches",
            PRODUCER,
            _branches(branch("b", name, evil)),
        )
        assert_error(r, 422)
    for i, name in enumerate(PARTICIPANTS):
        body = _branches(branch(f"http:..127.0.0.1:6666.{i}", name, evil))
        r = await send(client, "POST", f"{TX}/http:..127.0.0.1:6666/branches", PRODUCER, body)
        assert r.status_code == 200, r.text
        answers += r.json()["branches"]
    assert {a["try_url"] for a in answers} == configured
    stored = await tcc_db.fetch("SELECT DISTINCT participant FROM rmsg_tcc_branch")
    assert {r["participant"] for r in stored} == set(PARTICIPANTS)
    # nor does any answer carry a participant's token
    tx = await send(client, "GET", f"{TX}/http:..127.0.0.1:6666", ADMIN)
    for _, token in PARTICIPANTS.values():
        assert token not in tx.text and token not in json.dumps(answers)


# -- logs and the driver's kick ------------------------------------------------------------


async def test_moves_are_logged_with_the_gid_as_a_json_field(
    client: httpx.AsyncClient, tcc_db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="reliable_msg.service.tcc")
    await begin(client, "log-1")
    await register(client, "log-1", branch("a"))
    await move(client, "log-1", "commit")
    records = [r for r in caplog.records if r.name == "reliable_msg.service.tcc.usecases"]
    assert len(records) == 3
    for record in records:
        assert json.loads(JsonFormatter().format(record))["gid"] == "log-1"


async def test_a_kick_that_fails_leaves_the_commit_made(
    client: httpx.AsyncClient,
    tcc_db: asyncpg.Connection,
    runtime: Runtime,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(gid: str) -> None:
        raise RuntimeError("driver stopped")

    runtime.coordinator = Coordinator(runtime.settings, runtime.tcc_store, kick=broken)
    await begin(client, "k-1")
    await register(client, "k-1", branch("a"))
    assert (await move(client, "k-1", "commit"))["status"] == "confirming"
    assert any(
        r.levelno == logging.ERROR and getattr(r, "gid", None) == "k-1" for r in caplog.records
    )
