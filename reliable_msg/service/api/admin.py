"""The admin's calls: list messages, requeue dead ones, and the counts."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from reliable_msg.errors import Code, Unprocessable
from reliable_msg.service import cursor as page_cursor
from reliable_msg.service.api.deps import Admin, PathId, UseCasesOf, runtime_of
from reliable_msg.service.api.errors import LIMITED
from reliable_msg.service.schemas import GroupName, MessageOut, PageOut, RequeuedOut, Topic
from reliable_msg.states import MessageStatus

router = APIRouter(responses=LIMITED)


@router.get("/v1/messages", response_model=PageOut)
async def list_messages(
    _: Admin,
    usecases: UseCasesOf,
    status: MessageStatus | None = None,
    topic: Topic | None = None,
    group: GroupName | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: str | None = None,
) -> PageOut:
    page = await usecases.page(
        status=status, topic=topic, group=group, limit=limit, after=page_cursor.decode(cursor)
    )
    return PageOut(
        messages=[MessageOut.of(m) for m in page.messages],
        next_cursor=page_cursor.encode(page.next_cursor),
    )


@router.post("/v1/messages/{id}/requeue", response_model=MessageOut)
async def requeue(id: PathId, _: Admin, usecases: UseCasesOf) -> MessageOut:
    return MessageOut.of(await usecases.requeue(id))


@router.post("/v1/requeue", response_model=RequeuedOut)
async def requeue_all(
    _: Admin,
    usecases: UseCasesOf,
    request: Request,
    topic: Topic | None = None,
    group: GroupName | None = None,
) -> RequeuedOut:
    if group is not None and group not in runtime_of(request).settings.groups:
        raise Unprocessable(f"no consumer group {group!r}", code=Code.UNKNOWN_GROUP)
    done = await usecases.requeue_all(topic, group)
    return RequeuedOut(requeued=done.requeued, refused=done.refused)


@router.get("/v1/stats")
async def stats(_: Admin, usecases: UseCasesOf, request: Request) -> dict[str, Any]:
    stats = await usecases.stats()
    stats["broker"] = await runtime_of(request).broker_report()
    return stats
