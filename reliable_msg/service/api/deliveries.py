"""The consumer groups' calls: ack a delivery, one or a batch."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from reliable_msg.service.api.answers import batch, check_batch, fast_json, raise_or
from reliable_msg.service.api.deps import Group, GroupCommitOf, PathId
from reliable_msg.service.api.errors import LIMITED
from reliable_msg.service.schemas import AckOut, BatchOut, IdsIn
from reliable_msg.service.usecases import Acked
from reliable_msg.states import DeliveryStatus

router = APIRouter(responses=LIMITED)


@router.post("/v1/messages/{id}/ack", response_model=AckOut)
async def ack(id: PathId, who: Group, shared: GroupCommitOf) -> Response:
    [result] = await shared.ack(who.name, [id])
    acked = raise_or(result, Acked)
    return fast_json({"id": acked.id, "group": acked.group, "status": DeliveryStatus.DONE})


@router.post("/v1/batch/ack", response_model=BatchOut)
async def ack_batch(body: IdsIn, who: Group, shared: GroupCommitOf, request: Request) -> Response:
    check_batch(request, body.ids)
    return batch(body.ids, await shared.ack(who.name, body.ids))
