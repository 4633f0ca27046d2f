"""The TCC coordinator's calls under ``/v1/tcc/``: the initiator's (a producer token)
begin, register, commit, cancel and read; the admin's list, read and retry now."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, StringConstraints

from reliable_msg.policy import NAME_RE
from reliable_msg.service import cursor as page_cursor
from reliable_msg.service.api.answers import fast_json
from reliable_msg.service.api.deps import Admin, PathId, Producer, Reader, runtime_of
from reliable_msg.service.api.errors import LIMITED
from reliable_msg.service.auth import Role
from reliable_msg.service.tcc.schemas import (
    BeginIn,
    RegisteredOut,
    RegisterIn,
    TransactionOut,
    TransactionPageOut,
    TransactionSummaryOut,
    TryCallOut,
)
from reliable_msg.service.tcc.states import TxStatus
from reliable_msg.service.tcc.transaction import NewBranch
from reliable_msg.service.tcc.usecases import Coordinator
from reliable_msg.service.usecases import payload_text

router = APIRouter(prefix="/v1/tcc", responses=LIMITED, tags=["tcc"])


async def _coordinator(request: Request) -> Coordinator:
    return runtime_of(request).coordinator


CoordinatorOf = Annotated[Coordinator, Depends(_coordinator)]
Name = Annotated[str, StringConstraints(pattern=NAME_RE.pattern)]
#: Strictly ``true`` or ``false``: a ``1`` or a ``yes`` is refused, not guessed at.
StrictBool = Literal["true", "false"]


def _json(model: BaseModel, status: int = 200) -> Response:
    return fast_json(model.model_dump(mode="json"), status)


@router.post(
    "/transactions",
    status_code=201,
    response_model=TransactionOut,
    responses={200: {"model": TransactionOut, "description": "Begun before: its state now"}},
)
async def begin(body: BeginIn, who: Producer, coordinator: CoordinatorOf) -> Response:
    tx, created = await coordinator.begin(who.name, body.gid, body.timeout)
    return _json(TransactionOut.of(tx), 201 if created else 200)


@router.post("/transactions/{gid}/branches", response_model=RegisteredOut)
async def register(
    gid: PathId, body: RegisterIn, who: Producer, coordinator: CoordinatorOf
) -> Response:
    branches = [NewBranch(b.branch, b.participant, payload_text(b.payload)) for b in body.branches]
    calls = await coordinator.register(who.name, gid, branches)
    return _json(RegisteredOut(gid=gid, branches=[TryCallOut.of(c) for c in calls]))


@router.post("/transactions/{gid}/commit", response_model=TransactionOut)
async def commit(gid: PathId, who: Producer, coordinator: CoordinatorOf) -> Response:
    return _json(TransactionOut.of(await coordinator.commit(who.name, gid)))


@router.post("/transactions/{gid}/cancel", response_model=TransactionOut)
async def cancel(gid: PathId, who: Producer, coordinator: CoordinatorOf) -> Response:
    return _json(TransactionOut.of(await coordinator.cancel(who.name, gid)))


@router.get("/transactions/{gid}", response_model=TransactionOut)
async def get_transaction(gid: PathId, who: Reader, coordinator: CoordinatorOf) -> Response:
    initiator = who.name if who.role is Role.PRODUCER else None
    return _json(TransactionOut.of(await coordinator.get(gid, initiator)))


@router.get("/transactions", response_model=TransactionPageOut)
async def list_transactions(
    _: Admin,
    coordinator: CoordinatorOf,
    status: TxStatus | None = None,
    stalled: StrictBool | None = None,
    participant: Name | None = None,
    initiator: Name | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: str | None = None,
) -> Response:
    page = await coordinator.page(
        status=status,
        stalled=None if stalled is None else stalled == "true",
        participant=participant,
        initiator=initiator,
        limit=limit,
        before=page_cursor.decode(cursor),
    )
    out = TransactionPageOut(
        items=[TransactionSummaryOut.of(tx) for tx in page.transactions],
        next_cursor=page_cursor.encode(page.next_cursor),
    )
    return _json(out)


@router.post("/transactions/{gid}/retry", response_model=TransactionOut)
async def retry(gid: PathId, _: Admin, coordinator: CoordinatorOf) -> Response:
    return _json(TransactionOut.of(await coordinator.retry(gid)))
