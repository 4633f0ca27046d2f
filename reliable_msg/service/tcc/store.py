"""The coordinator's SQL over ``rmsg_tcc_*`` (migration ``0005_tcc.sql``), through the
service's own pool.

Each request is one short database transaction that first locks the transaction's row
(``FOR UPDATE``), so a register, a commit, a cancel and the deadline scanner meet one at
a time; every move is a guarded update built from :mod:`.states` and writes its event
row in the same transaction. Deadlines and every time are the database's ``now()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

from reliable_msg.errors import ReliableMsgError
from reliable_msg.service.store.connection import Conn, translated
from reliable_msg.service.tcc.retention import Retention
from reliable_msg.service.tcc.states import (
    CANCEL,
    CANCELLED,
    COMMIT,
    CONFIRMED,
    EXPIRE,
    TX_FINAL,
    BranchStatus,
    Move,
    TxStatus,
)
from reliable_msg.service.tcc.transaction import (
    Branch,
    Decided,
    Event,
    EventOp,
    NewBranch,
    Outcome,
    Transaction,
    TxPage,
    Verdict,
)

T = TxStatus

#: The columns :func:`_transaction` reads; ``$stalled`` is the stalled_after parameter.
_TX_COLUMNS = """
    gid, initiator, status, extract(epoch FROM timeout)::float8 AS timeout, deadline,
    created_at, updated_at, finished_at, next_try_at, attempts,
    (status IN ('confirming', 'cancelling')
     AND updated_at < now() - make_interval(secs => {stalled})) AS stalled
"""

#: Which event each move writes.
_EVENT_OF: dict[Move[TxStatus], EventOp] = {
    COMMIT: EventOp.COMMIT,
    CANCEL: EventOp.CANCEL,
    EXPIRE: EventOp.EXPIRE,
    CONFIRMED: EventOp.CONFIRMED,
    CANCELLED: EventOp.CANCELLED,
}

#: What the initiator's commit and cancel make of a transaction in each other status.
_REPEATS = {
    COMMIT: frozenset({T.CONFIRMING, T.CONFIRMED}),
    CANCEL: frozenset({T.CANCELLING, T.CANCELLED}),
}
#: The move that finishes a transaction with no branch right after the commit or cancel.
_FINISH = {COMMIT: CONFIRMED, CANCEL: CANCELLED}


class TccStore(Retention):
    """Transactions, branches and events in PostgreSQL; implements
    :class:`~reliable_msg.service.tcc.ports.TransactionStore`. ``instance`` signs the
    events; ``stalled_after`` (seconds) is ``tcc.stalled_after``."""

    def __init__(self, pool: asyncpg.Pool, *, instance: str, stalled_after: float) -> None:
        super().__init__(pool)
        self._instance = instance
        self._columns = _TX_COLUMNS.format(stalled=float(stalled_after))

    # -- the initiator's moves -----------------------------------------------------------

    @translated
    async def begin(self, gid: str, initiator: str, seconds: float) -> Decided:
        """A new ``trying`` transaction whose deadline is ``seconds`` from now (DONE), the
        one with this gid (ALREADY), or nothing when the purge deleted a transaction with
        this gid (REUSED)."""
        try:
            async with self._tx() as conn:
                # The purge deletes a gid and records it in one database transaction: an
                # insert waiting on its delete goes ahead once it commits, and the check
                # after it (a new snapshot) sees the record, and undoes the insert.
                created = await conn.fetchval(
                    """
                    INSERT INTO rmsg_tcc_transaction (gid, initiator, status, timeout, deadline)
                    SELECT $1, $2, $3, make_interval(secs => $4),
                           now() + make_interval(secs => $4)
                    WHERE NOT EXISTS (SELECT 1 FROM rmsg_tcc_used_gid WHERE gid = $1)
                    ON CONFLICT (gid) DO NOTHING RETURNING true
                    """,
                    gid,
                    initiator,
                    T.TRYING.value,
                    seconds,
                )
                if created and await self._used(conn, gid):
                    raise _Reused(f"gid {gid!r} was purged")
                if created:
                    await self._event(conn, gid, EventOp.BEGIN)
                tx = await self._read(conn, gid)
        except _Reused:
            return Decided(Verdict.REUSED)
        if tx is None:  # not inserted, and not there: used, and purged since
            return Decided(Verdict.REUSED)
        return Decided(Verdict.DONE if created else Verdict.ALREADY, tx)

    async def _used(self, conn: Conn, gid: str) -> bool:
        return bool(await conn.fetchval("SELECT true FROM rmsg_tcc_used_gid WHERE gid = $1", gid))

    @translated
    async def register(
        self, gid: str, initiator: str, branches: Sequence[NewBranch], max_branches: int
    ) -> Decided:
        """Insert the new ones of ``branches`` (those already there identically are a
        repeat) while the transaction is ``trying`` and before its deadline; past it, make
        EXPIRE instead. Nothing is written on any other verdict."""
        async with self._tx() as conn:
            locked = await self._lock(conn, gid, initiator)
            if locked is None:
                return Decided(Verdict.UNKNOWN)
            status, on_time = locked
            if status is not T.TRYING:
                return Decided(Verdict.WRONG_STATUS, await self._read(conn, gid))
            if not on_time:
                return await self._expire(conn, gid)
            return await self._insert_branches(conn, gid, branches, max_branches)

    async def _insert_branches(
        self, conn: Conn, gid: str, branches: Sequence[NewBranch], max_branches: int
    ) -> Decided:
        names = [b.branch for b in branches]
        rows = await conn.fetch(
            """
            SELECT i.branch, b.participant = i.participant AND b.payload = i.payload::jsonb
                   AS same
            FROM unnest($2::text[], $3::text[], $4::text[]) AS i (branch, participant, payload)
            JOIN rmsg_tcc_branch b ON b.gid = $1 AND b.branch = i.branch
            """,
            gid,
            names,
            [b.participant for b in branches],
            [b.payload for b in branches],
        )
        conflicts = sorted(r["branch"] for r in rows if not r["same"])
        if conflicts:
            return Decided(Verdict.CONFLICT, detail=conflicts[0])
        known = {r["branch"] for r in rows}
        new = [b for b in branches if b.branch not in known]
        if not new:
            return Decided(Verdict.ALREADY)
        count = await conn.fetchval("SELECT count(*) FROM rmsg_tcc_branch WHERE gid = $1", gid)
        if count + len(new) > max_branches:
            return Decided(Verdict.TOO_MANY, detail=str(count + len(new)))
        await conn.execute(
            """
            WITH new AS (
                INSERT INTO rmsg_tcc_branch (gid, branch, participant, payload, status)
                SELECT $1, i.branch, i.participant, i.payload::jsonb, $5
                FROM unnest($2::text[], $3::text[], $4::text[])
                     WITH ORDINALITY AS i (branch, participant, payload, n)
                ORDER BY i.n
                RETURNING branch)
            INSERT INTO rmsg_tcc_event (gid, branch, op, outcome, instance)
            SELECT $1, i.branch, $6, $7, $8
            FROM unnest($2::text[]) WITH ORDINALITY AS i (branch, n)
            WHERE i.branch IN (SELECT branch FROM new)
            ORDER BY i.n
            """,
            gid,
            [b.branch for b in new],
            [b.participant for b in new],
            [b.payload for b in new],
            BranchStatus.REGISTERED.value,
            EventOp.REGISTER.value,
            Outcome.OK.value,
            self._instance,
        )
        return Decided(Verdict.DONE)

    @translated
    async def commit(self, gid: str, initiator: str) -> Decided:
        """COMMIT (then CONFIRMED at once when it has no branch); EXPIRE past the deadline."""
        return await self._decide(gid, initiator, COMMIT)

    @translated
    async def cancel(self, gid: str, initiator: str) -> Decided:
        """CANCEL (then CANCELLED at once when it has no branch)."""
        return await self._decide(gid, initiator, CANCEL)

    async def _decide(self, gid: str, initiator: str, move: Move[TxStatus]) -> Decided:
        async with self._tx() as conn:
            locked = await self._lock(conn, gid, initiator)
            if locked is None:
                return Decided(Verdict.UNKNOWN)
            status, _ = locked
            if status in _REPEATS[move]:
                return Decided(Verdict.ALREADY, await self._read(conn, gid))
            if status is not T.TRYING:
                return Decided(Verdict.WRONG_STATUS, await self._read(conn, gid))
            if await self._move(conn, gid, move):
                await self._move(conn, gid, _FINISH[move])
                return Decided(Verdict.DONE, await self._read(conn, gid))
            # COMMIT's guard refused a trying transaction: its deadline passed.
            return await self._expire(conn, gid)

    async def _expire(self, conn: Conn, gid: str) -> Decided:
        """EXPIRE (then CANCELLED at once when it has no branch)."""
        await self._move(conn, gid, EXPIRE)
        await self._move(conn, gid, CANCELLED)
        return Decided(Verdict.EXPIRED, await self._read(conn, gid))

    async def _lock(self, conn: Conn, gid: str, initiator: str | None) -> tuple[T, bool] | None:
        """Lock the transaction's row: its status and whether it is before its deadline
        (None when unknown, or another initiator's)."""
        row = await conn.fetchrow(
            """
            SELECT status, deadline > now() AS on_time FROM rmsg_tcc_transaction
            WHERE gid = $1 AND ($2::text IS NULL OR initiator = $2) FOR UPDATE
            """,
            gid,
            initiator,
        )
        return None if row is None else (T(row["status"]), row["on_time"])

    async def _move(self, conn: Conn, gid: str, move: Move[TxStatus]) -> bool:
        """Make ``move`` on the transaction if its guard allows, with its event."""
        moved = await conn.fetchval(
            f"""
            UPDATE rmsg_tcc_transaction
            SET status = $2, updated_at = now(), next_try_at = NULL,
                finished_at = CASE WHEN $3 THEN now() END
            WHERE gid = $1 AND {move.applies()}
            RETURNING true
            """,
            gid,
            move.dst.value,
            move.dst in TX_FINAL,
        )
        if moved:
            await self._event(conn, gid, _EVENT_OF[move])
        return bool(moved)

    async def _event(self, conn: Conn, gid: str, op: EventOp, branch: str | None = None) -> None:
        await conn.execute(
            "INSERT INTO rmsg_tcc_event (gid, branch, op, outcome, instance)"
            " VALUES ($1, $2, $3, $4, $5)",
            gid,
            branch,
            op.value,
            Outcome.OK.value,
            self._instance,
        )

    # -- the admin's ---------------------------------------------------------------------

    @translated
    async def retry(self, gid: str) -> Decided:
        """Reset the waits of a confirming or cancelling transaction and of its
        registered branches: the driver takes it at once."""
        async with self._tx() as conn:
            locked = await self._lock(conn, gid, None)
            if locked is None:
                return Decided(Verdict.UNKNOWN)
            if locked[0] not in (T.CONFIRMING, T.CANCELLING):
                return Decided(Verdict.WRONG_STATUS, await self._read(conn, gid))
            await conn.execute(
                "UPDATE rmsg_tcc_transaction SET next_try_at = NULL WHERE gid = $1", gid
            )
            await conn.execute(
                "UPDATE rmsg_tcc_branch SET next_try_at = NULL WHERE gid = $1 AND status = $2",
                gid,
                BranchStatus.REGISTERED.value,
            )
            await self._event(conn, gid, EventOp.RETRY)
            return Decided(Verdict.DONE, await self._read(conn, gid))

    # -- reads ---------------------------------------------------------------------------

    @translated
    async def get(self, gid: str, *, last_events: int | None = None) -> Transaction | None:
        """The transaction with its branches and events (only its ``last_events`` latest
        ones when given: a transaction retried for days has thousands), in one snapshot."""
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            return await self._read(conn, gid, last_events)

    async def _read(
        self, conn: Conn, gid: str, last_events: int | None = None
    ) -> Transaction | None:
        row = await conn.fetchrow(
            f"SELECT {self._columns} FROM rmsg_tcc_transaction WHERE gid = $1", gid
        )
        if row is None:
            return None
        branches = await conn.fetch(
            """
            SELECT branch, participant, status, attempts, next_try_at, last_error,
                   last_status, updated_at
            FROM rmsg_tcc_branch WHERE gid = $1 ORDER BY branch
            """,
            gid,
        )
        events = await conn.fetch(
            """
            SELECT id, branch, op, outcome, http_status, error, instance, at
            FROM rmsg_tcc_event WHERE gid = $1 ORDER BY id DESC LIMIT $2
            """,
            gid,
            last_events,  # NULL: no limit
        )
        left_out = 0
        if last_events is not None and len(events) == last_events:
            total = await conn.fetchval("SELECT count(*) FROM rmsg_tcc_event WHERE gid = $1", gid)
            left_out = total - last_events
        return _transaction(
            row,
            tuple(Branch(**{**dict(b), "status": BranchStatus(b["status"])}) for b in branches),
            tuple(Event(**dict(e)) for e in reversed(events)),
            left_out,
        )

    @translated
    async def page(
        self,
        *,
        status: TxStatus | None,
        stalled: bool | None,
        participant: str | None,
        initiator: str | None,
        limit: int,
        before: tuple[datetime, str] | None,
    ) -> TxPage:
        """Transactions newest first, keyset-paginated on (created_at, gid)."""
        before_at, before_gid = before if before else (None, None)
        rows = await self._pool.fetch(
            f"""
            SELECT * FROM (SELECT {self._columns} FROM rmsg_tcc_transaction t
                WHERE ($1::text IS NULL OR status = $1)
                  AND ($3::text IS NULL OR EXISTS (
                        SELECT 1 FROM rmsg_tcc_branch b
                        WHERE b.gid = t.gid AND b.participant = $3))
                  AND ($4::text IS NULL OR initiator = $4)
                  AND ($5::timestamptz IS NULL OR (created_at, gid) < ($5, $6::text))
            ) AS listed
            WHERE ($2::boolean IS NULL OR stalled = $2)
            ORDER BY created_at DESC, gid DESC
            LIMIT $7
            """,
            status.value if status else None,
            stalled,
            participant,
            initiator,
            before_at,
            before_gid,
            limit + 1,
        )
        found = [_transaction(r) for r in rows[:limit]]
        more = len(rows) > limit
        cursor = (found[-1].created_at, found[-1].gid) if more and found else None
        return TxPage(found, cursor)


class _Reused(ReliableMsgError):
    """Raised in :meth:`TccStore.begin` to undo an insert of a purged gid; never leaves
    it (the verdict REUSED does)."""


def _transaction(
    row: asyncpg.Record,
    branches: tuple[Branch, ...] = (),
    events: tuple[Event, ...] = (),
    events_left_out: int = 0,
) -> Transaction:
    return Transaction(
        gid=row["gid"],
        initiator=row["initiator"],
        status=TxStatus(row["status"]),
        timeout=row["timeout"],
        deadline=row["deadline"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        finished_at=row["finished_at"],
        next_try_at=row["next_try_at"],
        attempts=row["attempts"],
        stalled=row["stalled"],
        branches=branches,
        events=events,
        events_left_out=events_left_out,
    )
