"""Request and response bodies of the ``/v1/tcc/`` API (in the service's one OpenAPI
document, beside :mod:`reliable_msg.service.schemas`)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue

from reliable_msg.service.schemas import MessageId, storable
from reliable_msg.service.tcc.states import BranchStatus, TxStatus
from reliable_msg.service.tcc.transaction import Branch, Event, Transaction
from reliable_msg.service.tcc.usecases import TryCall

#: A transaction's gid or a branch id: 1 to 128 of ``A-Z a-z 0-9 . _ : -``, as a message id.
Gid = MessageId


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BeginIn(_In):
    gid: Gid = Field(description="Chosen by the initiator; a repeat answers the same transaction")
    timeout: Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)] = Field(
        description="Seconds until the deadline, past which a trying transaction is "
        "cancelled; at most tcc.max_timeout"
    )


class BranchIn(_In):
    branch: Gid
    participant: str = Field(description="A [participants.<name>] of the configuration")
    payload: Annotated[JsonValue, AfterValidator(storable)] = Field(
        default=None, description="Any JSON value; sent to every call of the branch"
    )


class RegisterIn(_In):
    branches: list[BranchIn] = Field(min_length=1)


class TryCallOut(BaseModel):
    branch: str
    participant: str
    try_url: str
    proof: str

    @classmethod
    def of(cls, c: TryCall) -> TryCallOut:
        return cls(branch=c.branch, participant=c.participant, try_url=c.try_url, proof=c.proof)


class RegisteredOut(BaseModel):
    gid: str
    branches: list[TryCallOut]


class BranchOut(BaseModel):
    branch: str
    participant: str
    status: BranchStatus
    attempts: int
    next_try_at: datetime | None
    last_error: str | None
    last_status: int | None
    updated_at: datetime

    @classmethod
    def of(cls, b: Branch) -> BranchOut:
        return cls(
            branch=b.branch,
            participant=b.participant,
            status=b.status,
            attempts=b.attempts,
            next_try_at=b.next_try_at,
            last_error=b.last_error,
            last_status=b.last_status,
            updated_at=b.updated_at,
        )


class EventOut(BaseModel):
    id: int
    branch: str | None
    op: str
    outcome: str
    http_status: int | None
    error: str | None
    instance: str | None
    at: datetime

    @classmethod
    def of(cls, e: Event) -> EventOut:
        return cls(
            id=e.id,
            branch=e.branch,
            op=e.op,
            outcome=e.outcome,
            http_status=e.http_status,
            error=e.error,
            instance=e.instance,
            at=e.at,
        )


class TransactionSummaryOut(BaseModel):
    """A transaction without its branches and events, as the list gives it."""

    gid: str
    initiator: str
    status: TxStatus
    timeout: float = Field(description="Seconds, as the begin asked")
    deadline: datetime
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    next_try_at: datetime | None
    attempts: int
    stalled: bool

    @classmethod
    def of(cls, tx: Transaction) -> TransactionSummaryOut:
        return cls(**_summary(tx))


class TransactionOut(TransactionSummaryOut):
    """A transaction with its branches and events: the detail, and the answers of begin,
    commit, cancel and retry."""

    branches: list[BranchOut]
    events: list[EventOut]

    @classmethod
    def of(cls, tx: Transaction) -> TransactionOut:
        return cls(
            **_summary(tx),
            branches=[BranchOut.of(b) for b in tx.branches],
            events=[EventOut.of(e) for e in tx.events],
        )


class TransactionPageOut(BaseModel):
    items: list[TransactionSummaryOut]
    next_cursor: str | None


def _summary(tx: Transaction) -> dict[str, Any]:
    return dict(
        gid=tx.gid,
        initiator=tx.initiator,
        status=tx.status,
        timeout=tx.timeout,
        deadline=tx.deadline,
        created_at=tx.created_at,
        updated_at=tx.updated_at,
        finished_at=tx.finished_at,
        next_try_at=tx.next_try_at,
        attempts=tx.attempts,
        stalled=tx.stalled,
    )
