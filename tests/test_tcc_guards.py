"""The guard SQL of every TCC move (reliable_msg/service/tcc/states.py) against the real
tables of migration 0005: valid, and moving exactly the rows it should. Each test runs in
a transaction rolled back at the end."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from reliable_msg.service.tcc.states import (
    BRANCH_CANCEL,
    BRANCH_CONFIRM,
    BRANCH_MOVES,
    CANCEL,
    CANCELLED,
    COMMIT,
    CONFIRMED,
    EXPIRE,
    TX_FINAL,
    TX_MOVES,
    BranchStatus,
    Move,
    TxStatus,
)

T = TxStatus
B = BranchStatus


@pytest.fixture
async def conn(db: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    tx = db.transaction()
    await tx.start()
    yield db
    await tx.rollback()


async def begin(
    conn: asyncpg.Connection, gid: str, status: TxStatus, *, late: bool = False
) -> None:
    """A transaction in ``status``; ``late``: its deadline has passed."""
    await conn.execute(
        "INSERT INTO rmsg_tcc_transaction (gid, initiator, status, timeout, deadline,"
        " created_at, finished_at) VALUES ($1, 'order', $2, interval '30 s',"
        " now() + CASE WHEN $3 THEN interval '-1 s' ELSE interval '30 s' END,"
        " now() - interval '31 s', CASE WHEN $4 THEN now() END)",
        gid,
        status.value,
        late,
        status in TX_FINAL,
    )


async def register(conn: asyncpg.Connection, gid: str, *statuses: BranchStatus) -> None:
    for i, status in enumerate(statuses):
        await conn.execute(
            "INSERT INTO rmsg_tcc_branch (gid, branch, participant, payload, status)"
            " VALUES ($1, $2, 'inventory', '{}', $3)",
            gid,
            f"b{i}",
            status.value,
        )


async def move_tx(conn: asyncpg.Connection, gid: str, move: Move[TxStatus]) -> bool:
    """Make ``move`` as the store will: one guarded UPDATE; whether it moved the row."""
    done = await conn.fetchval(
        "UPDATE rmsg_tcc_transaction SET status = $3, updated_at = now(),"
        " finished_at = CASE WHEN $4 THEN now() END"
        f" WHERE gid = $1 AND status = $2 AND {move.applies()} RETURNING gid",
        gid,
        *move.params,
        move.dst in TX_FINAL,
    )
    return done is not None


async def move_branch(conn: asyncpg.Connection, gid: str, move: Move[BranchStatus]) -> int:
    """Make ``move`` on every branch of ``gid`` it applies to; how many moved."""
    moved = await conn.fetch(
        "UPDATE rmsg_tcc_branch SET status = $3, updated_at = now()"
        f" WHERE gid = $1 AND status = $2 AND {move.applies()} RETURNING branch",
        gid,
        *move.params,
    )
    return len(moved)


async def status_of(conn: asyncpg.Connection, gid: str) -> str:
    return str(await conn.fetchval("SELECT status FROM rmsg_tcc_transaction WHERE gid = $1", gid))


@pytest.mark.parametrize("move", TX_MOVES, ids=lambda m: m.why)
async def test_every_transaction_guard_is_valid_sql(
    conn: asyncpg.Connection, move: Move[TxStatus]
) -> None:
    assert not await move_tx(conn, "nothing", move)


@pytest.mark.parametrize("move", BRANCH_MOVES, ids=lambda m: m.why)
async def test_every_branch_guard_is_valid_sql(
    conn: asyncpg.Connection, move: Move[BranchStatus]
) -> None:
    assert await move_branch(conn, "nothing", move) == 0


async def test_commit_before_the_deadline_only_and_expire_after_it_only(
    conn: asyncpg.Connection,
) -> None:
    await begin(conn, "on-time", T.TRYING)
    await begin(conn, "late", T.TRYING, late=True)
    assert not await move_tx(conn, "on-time", EXPIRE)
    assert not await move_tx(conn, "late", COMMIT)
    assert await move_tx(conn, "on-time", COMMIT)
    assert await move_tx(conn, "late", EXPIRE)
    assert (await status_of(conn, "on-time"), await status_of(conn, "late")) == (
        "confirming",
        "cancelling",
    )


async def test_a_committed_transaction_is_never_cancelled(conn: asyncpg.Connection) -> None:
    await begin(conn, "g", T.CONFIRMING, late=True)
    for move in (CANCEL, EXPIRE, COMMIT, CANCELLED):
        assert not await move_tx(conn, "g", move)
    assert await status_of(conn, "g") == "confirming"


async def test_confirmed_only_when_every_branch_is(conn: asyncpg.Connection) -> None:
    await begin(conn, "g", T.CONFIRMING)
    await register(conn, "g", B.CONFIRMED, B.REGISTERED)
    assert not await move_tx(conn, "g", CONFIRMED)
    assert await move_branch(conn, "g", BRANCH_CONFIRM) == 1
    assert await move_tx(conn, "g", CONFIRMED)
    assert await status_of(conn, "g") == "confirmed"
    assert not await move_tx(conn, "g", CONFIRMED)  # never twice


async def test_cancelled_only_when_every_branch_is(conn: asyncpg.Connection) -> None:
    await begin(conn, "g", T.TRYING)
    await register(conn, "g", B.REGISTERED, B.REGISTERED)
    assert await move_branch(conn, "g", BRANCH_CANCEL) == 0  # still trying
    assert await move_tx(conn, "g", CANCEL)
    assert not await move_tx(conn, "g", CANCELLED)
    assert await move_branch(conn, "g", BRANCH_CONFIRM) == 0  # cancelling: no Confirm
    assert await move_branch(conn, "g", BRANCH_CANCEL) == 2
    assert await move_tx(conn, "g", CANCELLED)
    assert await status_of(conn, "g") == "cancelled"


async def test_a_branch_moves_only_with_its_transaction(conn: asyncpg.Connection) -> None:
    await begin(conn, "c", T.CONFIRMING)
    await register(conn, "c", B.REGISTERED)
    await begin(conn, "x", T.CANCELLING)
    await register(conn, "x", B.REGISTERED)
    assert await move_branch(conn, "c", BRANCH_CANCEL) == 0
    assert await move_branch(conn, "x", BRANCH_CONFIRM) == 0
    assert await move_branch(conn, "c", BRANCH_CONFIRM) == 1
    assert await move_branch(conn, "c", BRANCH_CONFIRM) == 0  # final: no way out
    assert await move_branch(conn, "x", BRANCH_CANCEL) == 1
