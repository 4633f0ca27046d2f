"""The coordinator's use-cases: begin, register, commit, cancel, read, list and retry now.

Routes call these; these check what the configuration allows (declared participants, the
``[tcc]`` limits), call the store through :class:`~.ports.TransactionStore`, and turn its
verdicts into the API's errors. After every move that leaves Confirm or Cancel calls to
make (commit, cancel, expire, retry now) they call ``kick(gid)``, which the runtime wires
to the driver so that those calls start at once rather than at its next pass.

The only URLs a registration answers are the configuration's (``participants.<name>.url``
and :meth:`ParticipantSettings.op_url`): a request names a participant, never a URL.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from reliable_msg.errors import (
    Code,
    Conflict,
    NotFound,
    PayloadTooLarge,
    RequestError,
    Unprocessable,
)
from reliable_msg.service.settings import Settings
from reliable_msg.service.tcc.ports import TransactionStore
from reliable_msg.service.tcc.states import TX_FINAL, TxStatus
from reliable_msg.service.tcc.transaction import (
    Decided,
    EventOp,
    NewBranch,
    Transaction,
    TxPage,
    Verdict,
)
from reliable_msg.tcc import Op, proof

log = logging.getLogger(__name__)

#: Starts driving one transaction now (the driver's ``kick``); must not block.
Kick = Callable[[str], None]

#: The finest timeout the database keeps (an interval is in microseconds).
RESOLUTION = 1e-6


@dataclass(frozen=True, slots=True)
class TryCall:
    """What the initiator needs to call one branch's Try."""

    branch: str
    participant: str
    #: ``<url>/try`` of the participant's configuration
    try_url: str
    #: the bearer proof of this one call (:func:`reliable_msg.tcc.proof`)
    proof: str


def _no_kick(gid: str) -> None:
    """Without a driver (tools, tests), its next pass takes the transaction."""


class Coordinator:
    """The TCC use-cases over a :class:`TransactionStore`."""

    def __init__(self, settings: Settings, store: TransactionStore, kick: Kick = _no_kick) -> None:
        self._settings = settings
        self._store = store
        self._kick = kick

    # -- the initiator's -----------------------------------------------------------------

    async def begin(self, initiator: str, gid: str, seconds: float) -> tuple[Transaction, bool]:
        """A new ``trying`` transaction whose deadline is ``seconds`` away, or (False) the
        one begun before with the same initiator and timeout, whatever its status now."""
        self._check_timeout(seconds)
        decided = await self._store.begin(gid, initiator, seconds)
        if decided.verdict is Verdict.REUSED:
            raise Conflict(
                f"transaction id {gid!r} was used by a transaction that is now purged; a gid"
                " is never reused (a participant's barrier still holds its rows)",
                code=Code.ID_REUSED,
            )
        tx = decided.tx
        assert tx is not None
        if decided.verdict is Verdict.DONE:
            log.info("tcc %s begun by %s", gid, initiator, extra={"gid": gid})
            return tx, True
        if tx.initiator != initiator or abs(tx.timeout - seconds) >= RESOLUTION:
            raise Conflict(
                f"transaction {gid!r} exists, begun by another producer or with another timeout",
                code=Code.ID_CONFLICT,
            )
        return tx, False

    def _check_timeout(self, seconds: float) -> None:
        limit = self._settings.tcc.max_timeout
        if not RESOLUTION <= seconds <= limit:
            raise Unprocessable(
                f"timeout must be from {RESOLUTION:g} to {limit:g} seconds (tcc.max_timeout); "
                f"got {seconds:g}",
                code=Code.INVALID_REQUEST,
            )

    async def register(
        self, initiator: str, gid: str, branches: Sequence[NewBranch]
    ) -> list[TryCall]:
        """Register branches of a ``trying`` transaction in one call (again: answered
        again); each answer names its Try's URL and proof, in the request's order."""
        self._check_branches(branches)
        decided = await self._store.register(
            gid, initiator, branches, self._settings.tcc.max_branches
        )
        if decided.verdict not in (Verdict.DONE, Verdict.ALREADY):
            raise self._refusal(gid, decided, wrong_status=Code.NOT_TRYING)
        if decided.verdict is Verdict.DONE:
            log.info(
                "tcc %s: registered %s",
                gid,
                ", ".join(f"{b.branch} at {b.participant}" for b in branches),
                extra={"gid": gid},
            )
        return [self._try_call(gid, b) for b in branches]

    def _check_branches(self, branches: Sequence[NewBranch]) -> None:
        cfg = self._settings.tcc
        if len(branches) > cfg.max_branches:
            raise Unprocessable(
                f"{len(branches)} branches; a transaction has at most {cfg.max_branches} "
                "(tcc.max_branches)",
                code=Code.TOO_MANY_BRANCHES,
            )
        names = [b.branch for b in branches]
        if len(set(names)) != len(names):
            raise Unprocessable("the request names the same branch twice", code=Code.DUPLICATE_ID)
        unknown = sorted({b.participant for b in branches} - set(self._settings.participants))
        if unknown:
            raise Unprocessable(
                f"no participant {', '.join(map(repr, unknown))} in the configuration",
                code=Code.UNKNOWN_PARTICIPANT,
            )
        for b in branches:
            size = len(b.payload.encode())
            if size > cfg.max_payload_bytes:
                raise PayloadTooLarge(
                    f"the payload of branch {b.branch!r} is {size} bytes as JSON; the limit "
                    f"is {cfg.max_payload_bytes} (tcc.max_payload_bytes)"
                )

    def _try_call(self, gid: str, b: NewBranch) -> TryCall:
        participant = self._settings.participants[b.participant]
        return TryCall(
            branch=b.branch,
            participant=b.participant,
            try_url=participant.op_url(Op.TRY),
            proof=proof(participant.token.get_secret_value(), gid, b.branch, Op.TRY),
        )

    async def commit(self, initiator: str, gid: str) -> Transaction:
        """``trying`` → ``confirming`` (``confirmed`` at once with no branch); a repeat
        answers the current state."""
        decided = await self._store.commit(gid, initiator)
        return self._moved(gid, decided, "committed", wrong_status=Code.ROLLED_BACK)

    async def cancel(self, initiator: str, gid: str) -> Transaction:
        """``trying`` → ``cancelling`` (``cancelled`` at once with no branch); a repeat
        answers the current state."""
        decided = await self._store.cancel(gid, initiator)
        return self._moved(gid, decided, "cancelled", wrong_status=Code.COMMITTED)

    def _moved(self, gid: str, decided: Decided, what: str, *, wrong_status: Code) -> Transaction:
        if decided.verdict not in (Verdict.DONE, Verdict.ALREADY):
            raise self._refusal(gid, decided, wrong_status=wrong_status)
        tx = decided.tx
        assert tx is not None
        if decided.verdict is Verdict.DONE:
            log.info("tcc %s %s: %s", gid, what, tx.status, extra={"gid": gid})
            self._drive(tx)
        return tx

    def _refusal(self, gid: str, decided: Decided, *, wrong_status: Code) -> RequestError:
        """The error for a verdict that wrote nothing the request asked for."""
        verdict, tx = decided.verdict, decided.tx
        if verdict is Verdict.UNKNOWN:
            return _unknown(gid)
        if verdict is Verdict.EXPIRED:
            assert tx is not None
            log.info("tcc %s expired: its deadline passed; cancelling", gid, extra={"gid": gid})
            self._drive(tx)
            return Conflict(
                f"transaction {gid!r} is past its deadline; it is being cancelled",
                code=Code.EXPIRED,
            )
        if verdict is Verdict.TOO_MANY:
            return Unprocessable(
                f"transaction {gid!r} would have {decided.detail} branches; the limit is "
                f"{self._settings.tcc.max_branches} (tcc.max_branches)",
                code=Code.TOO_MANY_BRANCHES,
            )
        if verdict is Verdict.CONFLICT:
            return Conflict(
                f"branch {decided.detail!r} of {gid!r} is registered with another "
                "participant or payload",
                code=Code.ID_CONFLICT,
            )
        assert tx is not None
        if wrong_status is Code.ROLLED_BACK and _expired(tx):
            # Not the initiator's cancel: its deadline passed (the scanner's or an earlier
            # request's EXPIRE); the initiator is told why, as on the request that expired it.
            return Conflict(
                f"transaction {gid!r} expired: its deadline passed; it is {tx.status}",
                code=Code.EXPIRED,
            )
        return Conflict(f"transaction {gid!r} is {tx.status}", code=wrong_status)

    def _drive(self, tx: Transaction) -> None:
        """Have the driver start on ``tx`` now, if it has calls to make. The move is
        committed already: a kick that fails leaves it to the driver's next pass."""
        if tx.status in TX_FINAL:
            return
        try:
            self._kick(tx.gid)
        except Exception:
            log.exception("tcc %s: could not start driving it", tx.gid, extra={"gid": tx.gid})

    # -- reads and the admin's -----------------------------------------------------------

    async def get(
        self, gid: str, initiator: str | None, *, last_events: int | None = None
    ) -> Transaction:
        """One transaction with its branches and events (its ``last_events`` latest ones
        when given); a producer sees only its own."""
        tx = await self._store.get(gid, last_events=last_events)
        if tx is None or (initiator is not None and tx.initiator != initiator):
            raise _unknown(gid)
        return tx

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
        return await self._store.page(
            status=status,
            stalled=stalled,
            participant=participant,
            initiator=initiator,
            limit=limit,
            before=before,
        )

    async def retry(self, gid: str) -> Transaction:
        """Retry now: reset the waits of a confirming or cancelling transaction and of its
        registered branches, and have the driver call them at once."""
        decided = await self._store.retry(gid)
        if decided.verdict is not Verdict.DONE:
            raise self._refusal(gid, decided, wrong_status=Code.CONFLICT)
        tx = decided.tx
        assert tx is not None
        log.info("tcc %s: retry now asked", gid, extra={"gid": gid})
        self._drive(tx)
        return tx


def _expired(tx: Transaction) -> bool:
    """Whether ``tx`` was cancelled by its deadline: its events hold the EXPIRE move."""
    return any(e.op == EventOp.EXPIRE and e.branch is None for e in tx.events)


def _unknown(gid: str) -> NotFound:
    return NotFound(f"no transaction {gid!r}")
