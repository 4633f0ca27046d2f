"""The driver's side of ``rmsg_tcc_*``: expire trying transactions past their deadline,
claim due confirming and cancelling ones under a lease, record each Confirm or Cancel
call as it ends, close each round, flag the stalled, and count for the gauges.

Every move is a guarded update built from :mod:`reliable_msg.service.tcc.states`, every
time the database's ``now()``, and every move and call appends its row to
``rmsg_tcc_event``. A claim takes rows with ``FOR UPDATE SKIP LOCKED`` and hides them
behind a lease (``lease_owner``, ``lease_until``), so two instances never drive one
transaction at once, and one that died mid-round loses it only until the lease ends (a
round that failed or was cancelled at a stop gives its lease up at once).
"""

from __future__ import annotations

import json

import asyncpg

from reliable_msg.service.store.connection import Pooled, translated
from reliable_msg.service.tcc.rounds import Claimed, DueBranch, TccCounts
from reliable_msg.service.tcc.states import (
    CANCELLED,
    CONFIRMED,
    DRIVEN,
    EXPIRE,
    BranchStatus,
    Move,
    TxStatus,
)
from reliable_msg.service.tcc.transaction import EventOp, Outcome

#: The statuses the driver calls branches in, as an SQL list.
_DRIVEN = "(" + ", ".join(f"'{s.value}'" for s in DRIVEN) + ")"
#: The statuses of an unfinished transaction, as an SQL list.
_UNFINISHED = f"('{TxStatus.TRYING.value}', " + _DRIVEN[1:]

#: One event row: gid, branch, op, outcome, http_status, error, instance.
_EVENT = "INSERT INTO rmsg_tcc_event (gid, branch, op, outcome, http_status, error, instance)"
_OK = f"'{Outcome.OK.value}'"
_FAILED = f"'{Outcome.FAILED.value}'"

#: Cancels trying transactions past their deadline (EXPIRE); due at once after it.
_EXPIRE = f"""
    WITH x AS (
        UPDATE rmsg_tcc_transaction
        SET status = $2, updated_at = now(), next_try_at = NULL
        WHERE gid IN (
            SELECT gid FROM rmsg_tcc_transaction
            WHERE status = $1 AND deadline <= now()
            ORDER BY deadline
            LIMIT $3
            FOR UPDATE SKIP LOCKED
        ) AND {EXPIRE.applies()}
        RETURNING gid
    ), e AS (
        {_EVENT} SELECT gid, NULL, '{EventOp.EXPIRE.value}', {_OK}, NULL, NULL, $4 FROM x
    )
    SELECT gid FROM x
"""

#: Claims due confirming and cancelling transactions (at most $3; only $4 when given)
#: by leasing them to $1 for $2 seconds, and reads their due registered branches: a
#: transaction with none comes once, with NULL branch columns.
_CLAIM = f"""
    WITH c AS (
        UPDATE rmsg_tcc_transaction
        SET lease_owner = $1, lease_until = now() + make_interval(secs => $2)
        WHERE gid IN (
            SELECT gid FROM rmsg_tcc_transaction
            WHERE status IN {_DRIVEN}
              AND (next_try_at IS NULL OR next_try_at <= now())
              AND (lease_until IS NULL OR lease_until <= now())
              AND ($4::text IS NULL OR gid = $4)
            ORDER BY next_try_at NULLS FIRST
            LIMIT $3
            FOR UPDATE SKIP LOCKED
        )
        RETURNING gid, status, lease_until
    )
    SELECT c.gid, c.status, c.lease_until,
           b.branch, b.participant, b.payload::text AS payload, b.attempts
    FROM c LEFT JOIN rmsg_tcc_branch AS b
      ON b.gid = c.gid AND b.status = $5
     AND (b.next_try_at IS NULL OR b.next_try_at <= now())
    ORDER BY c.gid, b.branch
"""

#: A call answered 2xx: the branch's move (guarded: only while its transaction is still
#: driven that way) and the call's event.
_CALL_OK = """
    WITH b AS (
        UPDATE rmsg_tcc_branch
        SET status = $4, attempts = attempts + 1, last_status = $5, next_try_at = NULL,
            updated_at = now()
        WHERE gid = $1 AND branch = $2 AND {applies}
        RETURNING gid
    ), e AS (
        {event} VALUES ($1, $2, $3, {ok}, $5, NULL, $6)
    )
    SELECT count(*) FROM b
"""

#: A call that failed: the branch tried again in $6 seconds, and the call's event.
_CALL_FAILED = f"""
    WITH b AS (
        UPDATE rmsg_tcc_branch
        SET attempts = attempts + 1, last_status = $4, last_error = $5,
            next_try_at = now() + make_interval(secs => $6), updated_at = now()
        WHERE gid = $1 AND branch = $2 AND status = $7
        RETURNING attempts
    ), e AS (
        {_EVENT} VALUES ($1, $2, $3, {_FAILED}, $4, $5, $8)
    )
    SELECT attempts FROM b
"""

#: The end of a round that finished every branch: the transaction's final move.
_FINISH = """
    WITH t AS (
        UPDATE rmsg_tcc_transaction
        SET status = $2, updated_at = now(), finished_at = now(), next_try_at = NULL,
            attempts = attempts + $4, stalled = false, lease_owner = NULL, lease_until = NULL
        WHERE gid = $1 AND {applies}
        RETURNING gid
    ), e AS (
        {event} SELECT gid, NULL, $3, {ok}, NULL, NULL, $5 FROM t
    )
    SELECT count(*) FROM t
"""

#: The end of any other round, by the lease's holder only: due again when its earliest
#: registered branch is (at once when one of them has no next try).
_RELEASE = """
    UPDATE rmsg_tcc_transaction
    SET attempts = attempts + $5, lease_owner = NULL, lease_until = NULL,
        next_try_at = (
            SELECT CASE WHEN bool_or(b.next_try_at IS NULL) THEN NULL
                        ELSE min(b.next_try_at) END
            FROM rmsg_tcc_branch AS b WHERE b.gid = $1 AND b.status = $6
        )
    WHERE gid = $1 AND status = $2 AND lease_owner = $3 AND lease_until = $4
"""

#: A round that did not end (an error, or cancelled at a stop): the lease given up, if
#: still ours, and nothing else; due as it was, so the next pass takes it again.
_GIVE_UP = """
    UPDATE rmsg_tcc_transaction SET lease_owner = NULL, lease_until = NULL
    WHERE gid = $1 AND lease_owner = $2 AND lease_until = $3
"""

#: Flags transactions confirming or cancelling since longer than $1 seconds, once each,
#: at most $3 (the oldest first; the next pass takes the rest).
_STALLED = f"""
    WITH s AS (
        UPDATE rmsg_tcc_transaction SET stalled = true
        WHERE gid IN (
            SELECT gid FROM rmsg_tcc_transaction
            WHERE status IN {_DRIVEN} AND NOT stalled
              AND updated_at < now() - make_interval(secs => $1)
            ORDER BY updated_at
            LIMIT $3
            FOR UPDATE SKIP LOCKED
        ) AND NOT stalled
        RETURNING gid
    ), e AS (
        {_EVENT} SELECT gid, NULL, '{EventOp.STALLED.value}', {_OK}, NULL, NULL, $2 FROM s
    )
    SELECT gid FROM s ORDER BY gid
"""

#: What the gauges show: transactions per status, the oldest unfinished one's age, the
#: stalled ones.
_COUNTS = f"""
    SELECT
        (SELECT coalesce(jsonb_object_agg(status, n), '{{}}')::text FROM (
            SELECT status, count(*) AS n FROM rmsg_tcc_transaction GROUP BY status) AS s
        ) AS statuses,
        (SELECT extract(epoch FROM now() - min(created_at)) FROM rmsg_tcc_transaction
         WHERE status IN {_UNFINISHED}) AS oldest,
        (SELECT count(*) FROM rmsg_tcc_transaction WHERE stalled) AS stalled
"""


#: The final move of a transaction in each driven status, and its event.
_FINAL: dict[TxStatus, tuple[Move[TxStatus], EventOp]] = {
    TxStatus.CONFIRMING: (CONFIRMED, EventOp.CONFIRMED),
    TxStatus.CANCELLING: (CANCELLED, EventOp.CANCELLED),
}


class Driving(Pooled):
    """The SQL of :class:`~reliable_msg.service.tcc.driver.Driver`, on the service's pool;
    implements :class:`~reliable_msg.service.tcc.ports.DrivingStore`."""

    @translated
    async def expire(self, instance: str, limit: int) -> list[str]:
        """Move trying transactions past their deadline to cancelling; their gids."""
        rows = await self._pool.fetch(_EXPIRE, *EXPIRE.params, limit, instance)
        return [r["gid"] for r in rows]

    @translated
    async def claim(
        self, owner: str, lease: float, limit: int, gid: str | None = None
    ) -> list[Claimed]:
        """Lease up to ``limit`` due transactions (only ``gid`` when given) to ``owner``
        for ``lease`` seconds, with their due branches."""
        rows = await self._pool.fetch(
            _CLAIM, owner, lease, limit, gid, BranchStatus.REGISTERED.value
        )
        return _claims(rows)

    @translated
    async def call_ok(self, tx: Claimed, branch: str, http_status: int, instance: str) -> bool:
        """Record a 2xx answer: the branch's move, if its transaction is still driven
        that way; whether it moved. The call's event either way."""
        sql = _CALL_OK.format(applies=tx.move.applies(), event=_EVENT, ok=_OK)
        moved = await self._pool.fetchval(
            sql, tx.gid, branch, EventOp(tx.op.value), tx.move.dst.value, http_status, instance
        )
        return bool(moved)

    @translated
    async def call_failed(
        self,
        tx: Claimed,
        branch: str,
        http_status: int | None,
        error: str,
        retry_in: float,
        instance: str,
    ) -> None:
        """Record a failed call: the branch is due again in ``retry_in`` seconds. A NUL in
        ``error`` (a participant's answer may hold one; PostgreSQL text cannot) is
        replaced, so that the call is recorded all the same."""
        await self._pool.fetchval(
            _CALL_FAILED,
            tx.gid,
            branch,
            EventOp(tx.op.value),
            http_status,
            error.replace("\x00", "\ufffd")[:1000],
            retry_in,
            BranchStatus.REGISTERED.value,
            instance,
        )

    @translated
    async def end_round(self, tx: Claimed, owner: str, instance: str, *, called: bool) -> bool:
        """Close a round: the final move when every branch is done (whether it was
        made), else release the lease, if still ours, until the earliest branch is due."""
        final, event = _FINAL[tx.status]
        attempts = int(called)
        # Two statements, not one database transaction: a FINISH that did not apply wrote
        # nothing, and RELEASE is guarded on its own (so BEGIN and COMMIT, two round trips
        # of every transaction's last round, are saved).
        sql = _FINISH.format(applies=final.applies(), event=_EVENT, ok=_OK)
        if await self._pool.fetchval(sql, tx.gid, final.dst.value, event, attempts, instance):
            return True
        await self._pool.execute(
            _RELEASE,
            tx.gid,
            tx.status.value,
            owner,
            tx.lease_until,
            attempts,
            BranchStatus.REGISTERED.value,
        )
        return False

    @translated
    async def release(self, tx: Claimed, owner: str) -> None:
        """Give up the lease of a round that did not end, if still ``owner``'s."""
        await self._pool.execute(_GIVE_UP, tx.gid, owner, tx.lease_until)

    @translated
    async def flag_stalled(self, after: float, instance: str, limit: int) -> list[str]:
        """Flag up to ``limit`` transactions confirming or cancelling for longer than
        ``after`` seconds as stalled (once each, with an event); the gids flagged now."""
        rows = await self._pool.fetch(_STALLED, after, instance, limit)
        return [r["gid"] for r in rows]

    @translated
    async def counts(self) -> TccCounts:
        row = await self._pool.fetchrow(_COUNTS)
        assert row is not None
        return TccCounts(
            statuses={k: int(v) for k, v in json.loads(row["statuses"]).items()},
            oldest=float(row["oldest"] or 0.0),
            stalled=int(row["stalled"]),
        )


def _claims(rows: list[asyncpg.Record]) -> list[Claimed]:
    by_gid: dict[str, tuple[asyncpg.Record, list[DueBranch]]] = {}
    for r in rows:
        _, branches = by_gid.setdefault(r["gid"], (r, []))
        if r["branch"] is not None:
            branches.append(
                DueBranch(r["branch"], r["participant"], json.loads(r["payload"]), r["attempts"])
            )
    return [
        Claimed(gid, TxStatus(r["status"]), r["lease_until"], tuple(branches))
        for gid, (r, branches) in by_gid.items()
    ]
