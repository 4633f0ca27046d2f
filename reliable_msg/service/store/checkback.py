"""Check-back's side of ``rmsg_message``: claim due pending messages under a lease, give
them back, and count a check-back without an answer."""

from __future__ import annotations

from collections.abc import Sequence

from reliable_msg.message import DueCheck
from reliable_msg.service.store.connection import Pooled, translated
from reliable_msg.service.store.rows import TRANSITION
from reliable_msg.states import CHECK_AGAIN, GIVE_UP, M

#: Claims due pending messages for check-back by pushing their next check past a lease,
#: skipping the producers named in $4 (those with no free call slot).
#: The partial index on pending rows makes its cost that of the due rows alone.
CLAIM_CHECKS = """
    UPDATE rmsg_message SET next_check_at = now() + make_interval(secs => $3)
    WHERE id IN (
        SELECT id FROM rmsg_message
        WHERE status = $1 AND next_check_at <= now() AND producer <> ALL($4::text[])
        ORDER BY next_check_at
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    ) AND status = $1
    RETURNING id, topic, producer, created_at, check_attempts
"""


class CheckBacks(Pooled):
    """The pending messages check-back asks their producers about."""

    @translated
    async def claim_checks(
        self, limit: int, lease: float, skip: Sequence[str] = ()
    ) -> list[DueCheck]:
        """Claim due ``pending`` messages, none of producers in ``skip``, by hiding them
        for ``lease`` seconds."""
        rows = await self._pool.fetch(CLAIM_CHECKS, M.PENDING.value, limit, lease, list(skip))
        return [DueCheck(**dict(r)) for r in rows]

    @translated
    async def release_checks(self, ids: Sequence[str]) -> None:
        """Give claimed messages back before their lease ends: due again at once."""
        await self._pool.execute(
            "UPDATE rmsg_message SET next_check_at = now() WHERE id = ANY($1) AND status = $2",
            list(ids),
            M.PENDING.value,
        )

    @translated
    async def check_failed(self, check: DueCheck, error: str, retry_in: float | None) -> bool:
        """Count a check-back that gave no answer: asked again in ``retry_in`` seconds
        (:data:`~reliable_msg.states.CHECK_AGAIN`), or dead when None (``GIVE_UP``)."""
        move = GIVE_UP if retry_in is None else CHECK_AGAIN
        moved = await self._pool.fetchval(
            f"""
            WITH m AS (
                UPDATE rmsg_message
                SET check_attempts = check_attempts + 1, last_error = $4, updated_at = now(),
                    status = $2,
                    next_check_at = CASE WHEN $5::float8 IS NULL THEN NULL
                                         ELSE now() + make_interval(secs => $5) END
                WHERE id = $3 AND status = $1 AND check_attempts = $6
                RETURNING id
            ), t AS (
                {TRANSITION}
                SELECT id, NULL, $1, $2, 'check-back exhausted: ' || $4 FROM m WHERE $7
            )
            SELECT count(*) FROM m
            """,
            *move.params,
            check.id,
            error[:1000],
            retry_in,
            check.check_attempts,
            move.recorded,
        )
        return bool(moved == 1)
