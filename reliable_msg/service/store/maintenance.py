"""Maintenance: retention (purge finished messages, free the ids of purged ones) and the
scanners' lag."""

from __future__ import annotations

from reliable_msg.service.store.connection import Pooled, translated
from reliable_msg.states import D, M


class Maintenance(Pooled):
    """Deletes in short batches, and the cheap reads the monitor polls."""

    @translated
    async def purge(self, older_than: float, batch: int) -> int:
        """Delete finished messages older than ``older_than`` seconds, in batches; their
        ids stay in ``rmsg_used_id``, refused to any new message."""
        return await self._delete_in_batches(
            """
            DELETE FROM rmsg_message WHERE id IN (
                SELECT id FROM rmsg_message
                WHERE status IN ($3, $4)
                  AND finished_at < now() - make_interval(secs => $1)
                LIMIT $2)
            """,
            older_than,
            batch,
            M.DONE.value,
            M.CANCELLED.value,
        )

    @translated
    async def forget_ids(self, older_than: float, batch: int) -> int:
        """Free the used ids older than ``older_than`` seconds whose message is gone."""
        return await self._delete_in_batches(
            """
            DELETE FROM rmsg_used_id WHERE id IN (
                SELECT u.id FROM rmsg_used_id u
                WHERE u.used_at < now() - make_interval(secs => $1)
                  AND NOT EXISTS (SELECT 1 FROM rmsg_message m WHERE m.id = u.id)
                LIMIT $2)
            """,
            older_than,
            batch,
        )

    @translated
    async def scanner_lag(self) -> dict[str, float]:
        """Per scanner, seconds since its oldest due row fell due (0 when none is due).

        Each is the first entry of the scanner's partial index: cheap at any table size.
        """
        row = await self._pool.fetchrow(
            """
            SELECT
                (SELECT extract(epoch FROM now() - min(next_check_at)) FROM rmsg_message
                 WHERE status = $1 AND next_check_at <= now()) AS checkback,
                (SELECT extract(epoch FROM now() - min(next_attempt_at)) FROM rmsg_delivery
                 WHERE status = $2 AND next_attempt_at <= now()) AS redelivery
            """,
            M.PENDING.value,
            D.SENT.value,
        )
        assert row is not None
        return {name: float(row[name] or 0.0) for name in ("checkback", "redelivery")}
