"""The participant's barrier: a row per (gid, branch, op) called, inserted first thing in
the call's own transaction, so that a call made again finds its row and has no second
effect (the same idea as the consumer's inbox).

Insert-first on the primary key, never select-then-insert: a second transaction
inserting the same key waits on it until the first one ends, then finds the row (the
first committed) or takes the key itself (it rolled back). So concurrent duplicates
never run twice and never deadlock on a read lock.

A branch's ``try`` row tells who wrote it in ``origin``: the Try itself, or a Cancel that
came first. Such a Cancel is an *empty rollback* (nothing to give back: recorded, no
effect) and its ``try`` row makes the Try that arrives after it *hang* no more: refused.
"""

from __future__ import annotations

from enum import StrEnum

import asyncpg

from reliable_msg.tcc import Op

#: The barrier table, created by :func:`install` in the participant's database.
BARRIER_TABLE = "rmsg_tcc_barrier"

BARRIER_DDL = f"""
CREATE TABLE IF NOT EXISTS {BARRIER_TABLE} (
    gid        text        NOT NULL,
    branch     text        NOT NULL,
    op         text        NOT NULL CHECK (op IN ('try', 'confirm', 'cancel')),
    -- the op of the call that wrote the row: a 'try' row written by a Cancel is 'cancel'
    origin     text        NOT NULL CHECK (origin IN ('try', 'confirm', 'cancel')),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gid, branch, op)
);
CREATE INDEX IF NOT EXISTS {BARRIER_TABLE}_created ON {BARRIER_TABLE} (created_at);
"""

Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


async def install(conn: Conn) -> None:
    """Create the barrier table in the participant's database (idempotent)."""
    await conn.execute(BARRIER_DDL)


class Passage(StrEnum):
    """What the barrier lets a call do."""

    RUN = "run"  #: first of its kind: run the handler
    DUPLICATE = "duplicate"  #: done already (or by a concurrent twin): answer done, run nothing
    EMPTY_ROLLBACK = "empty_rollback"  #: a Cancel before any Try: recorded, run nothing
    HANGING = "hanging"  #: a Try after its Cancel: refused, run nothing


async def cross(conn: Conn, gid: str, branch: str, op: Op) -> Passage:
    """In ``conn``'s open transaction: insert the call's barrier rows and say what the
    call may do. Blocks while another open transaction holds one of the same keys."""
    if op is Op.TRY:
        if await _insert(conn, gid, branch, Op.TRY, Op.TRY):
            return Passage.RUN
        origin = await conn.fetchval(
            f"SELECT origin FROM {BARRIER_TABLE} WHERE gid = $1 AND branch = $2 AND op = 'try'",
            gid,
            branch,
        )
        return Passage.HANGING if origin == Op.CANCEL else Passage.DUPLICATE
    if op is Op.CANCEL and await _insert(conn, gid, branch, Op.TRY, Op.CANCEL):
        await _insert(conn, gid, branch, Op.CANCEL, Op.CANCEL)
        return Passage.EMPTY_ROLLBACK
    return Passage.RUN if await _insert(conn, gid, branch, op, op) else Passage.DUPLICATE


async def _insert(conn: Conn, gid: str, branch: str, op: Op, origin: Op) -> bool:
    """Insert one barrier row; False if its key was there (committed) already."""
    inserted = await conn.fetchval(
        f"INSERT INTO {BARRIER_TABLE} (gid, branch, op, origin) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT DO NOTHING RETURNING true",
        gid,
        branch,
        op.value,
        origin.value,
    )
    return bool(inserted)


#: The default age below which :func:`purge_barriers` keeps a branch's rows.
PURGE_AGE = 7 * 24 * 3600.0


async def purge_barriers(
    pool: asyncpg.Pool, older_than: float = PURGE_AGE, *, batch: int = 1000
) -> int:
    """Delete the barrier rows no call can need any more; return how many rows went.
    Run it now and then (daily, say).

    A branch's rows go together, once the branch is finished (a ``confirm`` or
    ``cancel`` row) and all of them are older than ``older_than`` seconds (the database's
    clock). A lone ``try`` row stays whatever its age: its Confirm or Cancel may still
    come, and a late Cancel must find it (without it, the Cancel would be taken for an
    empty rollback and the Try's reservation never given back).

    ``older_than`` must exceed the coordinator's longest transaction timeout plus its
    retry horizon (the longest a Confirm or Cancel can be retried, or a duplicate call
    stay in flight): a call arriving after its branch's rows went would find no barrier
    and run again (a second Confirm), or a Try after its Cancel would no longer be
    refused. The 7 days default leaves that margin for any sane configuration.
    """
    total = 0
    while True:
        status = await pool.execute(
            f"""
            DELETE FROM {BARRIER_TABLE} b USING (
                SELECT gid, branch FROM {BARRIER_TABLE}
                GROUP BY gid, branch
                HAVING bool_or(op <> 'try')
                   AND max(created_at) < now() - make_interval(secs => $1)
                LIMIT $2
            ) AS done
            WHERE b.gid = done.gid AND b.branch = done.branch
            """,
            older_than,
            batch,
        )
        deleted = int(status.split()[-1])
        total += deleted
        if deleted == 0:
            return total
