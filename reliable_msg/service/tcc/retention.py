"""Retention of the TCC coordinator's rows: finished transactions deleted after
``tcc.retention`` with their branches and events, each deleted gid remembered in
``rmsg_tcc_used_gid`` (migration ``0006_tcc_used_gid.sql``) so that it is never begun
again, and those records freed after ``scanner.id_retention`` when it is set."""

from __future__ import annotations

from reliable_msg.constants import TCC_PURGE_SETTING
from reliable_msg.service.store.connection import Pooled, translated
from reliable_msg.service.tcc.states import TxStatus as T


class Retention(Pooled):
    """The purge's side of :class:`~reliable_msg.service.tcc.store.TccStore`."""

    @translated
    async def purge(self, older_than: float, batch: int) -> int:
        """Delete transactions finished more than ``older_than`` seconds ago, with their
        branches and events (by cascade, past the events' append-only trigger), in
        batches of ``batch``; how many. Each gid deleted is recorded in
        ``rmsg_tcc_used_gid`` in the same database transaction: never begun again."""
        total = 0
        while True:
            async with self._tx() as conn:
                await conn.execute(f"SET LOCAL {TCC_PURGE_SETTING} = 'on'")
                deleted = await conn.fetchval(
                    """
                    WITH d AS (
                        DELETE FROM rmsg_tcc_transaction WHERE gid IN (
                            SELECT gid FROM rmsg_tcc_transaction
                            WHERE status IN ($3, $4)
                              AND finished_at < now() - make_interval(secs => $1)
                            LIMIT $2)
                        RETURNING gid, initiator
                    ), u AS (
                        INSERT INTO rmsg_tcc_used_gid (gid, initiator)
                        SELECT gid, initiator FROM d
                        ON CONFLICT (gid) DO UPDATE SET purged_at = now()
                    )
                    SELECT count(*) FROM d
                    """,
                    older_than,
                    batch,
                    T.CONFIRMED.value,
                    T.CANCELLED.value,
                )
            total += int(deleted)
            if deleted < batch:
                return total

    @translated
    async def forget_gids(self, older_than: float, batch: int) -> int:
        """Free the gids purged more than ``older_than`` seconds ago
        (``scanner.id_retention``, as for the ids of purged messages)."""
        return await self._delete_in_batches(
            """
            DELETE FROM rmsg_tcc_used_gid WHERE gid IN (
                SELECT gid FROM rmsg_tcc_used_gid
                WHERE purged_at < now() - make_interval(secs => $1)
                LIMIT $2)
            """,
            older_than,
            batch,
        )
