"""TCC transactions, their branches and their activity log as the coordinator sees them,
independent of the store; and what a store call decided.

An event's ``op`` names a move of the transaction (:class:`EventOp`: ``begin``,
``register``, ``commit``, ...) or a call the driver made (``confirm``, ``cancel``); its
``outcome`` is ``ok`` or ``failed`` (:class:`Outcome`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from reliable_msg.service.tcc.states import BranchStatus, TxStatus


class EventOp(StrEnum):
    """What an event of ``rmsg_tcc_event`` records."""

    BEGIN = "begin"  #: the initiator began the transaction
    REGISTER = "register"  #: a new branch (one event per branch)
    COMMIT = "commit"  #: the initiator's commit (COMMIT)
    CANCEL = "cancel"  #: the initiator's cancel (CANCEL), or a Cancel call of a branch
    EXPIRE = "expire"  #: the deadline passed while trying (EXPIRE)
    CONFIRMED = "confirmed"  #: every branch confirmed (CONFIRMED)
    CANCELLED = "cancelled"  #: every branch cancelled (CANCELLED)
    RETRY = "retry"  #: an admin's retry now: the waits reset
    STALLED = "stalled"  #: flagged stalled
    CONFIRM = "confirm"  #: a Confirm call of a branch


class Outcome(StrEnum):
    OK = "ok"  #: a move made, or a call answered 2xx
    FAILED = "failed"  #: a call answered non-2xx, or not at all


@dataclass(frozen=True, slots=True)
class NewBranch:
    """A branch the initiator registers. ``payload`` is its compact JSON text."""

    branch: str
    participant: str
    payload: str


@dataclass(frozen=True, slots=True)
class Branch:
    branch: str
    participant: str
    status: BranchStatus
    attempts: int
    next_try_at: datetime | None
    last_error: str | None
    last_status: int | None
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    branch: str | None
    op: str
    outcome: str
    http_status: int | None
    error: str | None
    instance: str | None
    at: datetime


@dataclass(frozen=True, slots=True)
class Transaction:
    gid: str
    initiator: str
    status: TxStatus
    timeout: float  #: seconds, as the begin asked (to the microsecond)
    deadline: datetime
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    next_try_at: datetime | None
    attempts: int
    #: confirming or cancelling since longer than ``tcc.stalled_after`` (database clock)
    stalled: bool
    branches: tuple[Branch, ...] = ()
    events: tuple[Event, ...] = ()
    #: older events than the first of ``events``, not read (a read of the latest only)
    events_left_out: int = 0


class Verdict(StrEnum):
    """What a store call made of a request; the use-cases turn all but the first two
    into errors."""

    DONE = "done"  #: moved, or written
    ALREADY = "already"  #: already so (a repeat): nothing written
    UNKNOWN = "unknown"  #: no such transaction, or another initiator's
    EXPIRED = "expired"  #: past its deadline: nothing asked for written, EXPIRE made
    WRONG_STATUS = "wrong_status"  #: its status forbids the request: nothing written
    TOO_MANY = "too_many"  #: register: over ``tcc.max_branches``: nothing written
    CONFLICT = "conflict"  #: register: a branch exists with another body: nothing written
    REUSED = "reused"  #: begin: the gid's transaction was purged; gids are never reused


@dataclass(frozen=True, slots=True)
class Decided:
    """A store call's verdict, and the transaction after it (None when unknown)."""

    verdict: Verdict
    tx: Transaction | None = None
    #: the branch of a CONFLICT, the branch count of TOO_MANY
    detail: str = ""


@dataclass(frozen=True, slots=True)
class TxPage:
    """Transactions newest first, and where the next page starts."""

    transactions: list[Transaction]
    next_cursor: tuple[datetime, str] | None
