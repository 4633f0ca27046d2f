"""The producers' calls: prepare, confirm and cancel, one message or a batch, and read."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request, Response

from reliable_msg.message import Message, NewMessage
from reliable_msg.service.api.answers import (
    batch,
    check_batch,
    fast_json,
    message_json,
    raise_or,
)
from reliable_msg.service.api.deps import GroupCommitOf, PathId, Producer, Reader, UseCasesOf
from reliable_msg.service.api.errors import LIMITED
from reliable_msg.service.auth import Role
from reliable_msg.service.schemas import BatchOut, IdsIn, MessageIn, MessageOut, PrepareBatchIn
from reliable_msg.service.usecases import Prepared, payload_text

router = APIRouter(responses=LIMITED)


@router.post("/v1/messages", status_code=201, response_model=MessageOut)
async def prepare(body: MessageIn, who: Producer, shared: GroupCommitOf) -> Response:
    [result] = await shared.prepare(who.name, [_new(body)])
    prepared = raise_or(result, Prepared)
    return fast_json(message_json(prepared.message), 201 if prepared.created else 200)


@router.post("/v1/messages/{id}/confirm", response_model=MessageOut)
async def confirm(id: PathId, who: Producer, shared: GroupCommitOf) -> Response:
    [result] = await shared.confirm(who.name, [id])
    return fast_json(message_json(raise_or(result, Message)))


@router.post("/v1/messages/{id}/cancel", response_model=MessageOut)
async def cancel(id: PathId, who: Producer, usecases: UseCasesOf) -> Response:
    [result] = await usecases.cancel(who.name, [id])
    return fast_json(message_json(raise_or(result, Message)))


@router.post("/v1/batch/prepare", response_model=BatchOut)
async def prepare_batch(
    body: PrepareBatchIn, who: Producer, shared: GroupCommitOf, request: Request
) -> Response:
    items = [_new(m) for m in body.messages]
    check_batch(request, [n.id for n in items])
    results = await shared.prepare(who.name, items)
    return batch([n.id for n in items], results)


@router.post("/v1/batch/confirm", response_model=BatchOut)
async def confirm_batch(
    body: IdsIn, who: Producer, shared: GroupCommitOf, request: Request
) -> Response:
    check_batch(request, body.ids)
    return batch(body.ids, await shared.confirm(who.name, body.ids))


@router.post("/v1/batch/cancel", response_model=BatchOut)
async def cancel_batch(
    body: IdsIn, who: Producer, usecases: UseCasesOf, request: Request
) -> Response:
    check_batch(request, body.ids)
    return batch(body.ids, await usecases.cancel(who.name, body.ids))


@router.get("/v1/messages/{id}", response_model=MessageOut)
async def get_message(id: PathId, who: Reader, usecases: UseCasesOf) -> MessageOut:
    owner = who.name if who.role is Role.PRODUCER else None
    return MessageOut.of(await usecases.get(id, owner), deliveries=True)


def _new(body: MessageIn) -> NewMessage:
    return NewMessage(
        id=body.id or uuid.uuid4().hex,
        topic=body.topic,
        payload=payload_text(body.payload),
        headers=dict(body.headers),
        key=body.key,
    )
