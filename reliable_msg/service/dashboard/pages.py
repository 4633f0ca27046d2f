"""The dashboard's pages: the overview and the JSON its script polls, the message list
and a message's detail with its history."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from reliable_msg.message import Message
from reliable_msg.policy import NAME_RE, TOPIC_RE
from reliable_msg.service import cursor as page_cursor
from reliable_msg.service.dashboard.visit import Visit, start_of
from reliable_msg.service.runtime import Runtime, instance_name
from reliable_msg.states import FINAL, MessageStatus

#: Messages per page of the list, unless the URL says ``limit`` (up to 500).
PAGE_SIZE = 50

router = APIRouter(include_in_schema=False)


@router.get("/")
async def overview(request: Request) -> Response:
    visit = Visit.of(request)
    if visit.session is None:
        return visit.to_login()
    data = await _overview(visit.runtime)
    poll = max(1.0, min(visit.runtime.settings.monitor.interval, 30.0))
    return visit.render("overview.html", data=data, poll=poll, statuses=list(MessageStatus))


@router.get("/api/overview")
async def overview_json(request: Request) -> Response:
    visit = Visit.of(request)
    if visit.session is None:
        return JSONResponse({"error": "login required"}, status_code=401)
    return JSONResponse(await _overview(visit.runtime), headers={"Cache-Control": "no-store"})


@router.get("/api/messages/{id}")
async def message_json(request: Request, id: str) -> Response:
    visit = Visit.of(request)
    if visit.session is None:
        return JSONResponse({"error": "login required"}, status_code=401)
    found = await visit.find(id)
    if found is None:
        return JSONResponse({"error": "no such message"}, status_code=404)
    return JSONResponse({"id": found.id, "status": found.status.value})


@router.get("/messages")
async def messages(
    request: Request,
    status: str = "",
    topic: str = "",
    group: str = "",
    id: str = "",
    cursor: str = "",
    limit: Annotated[int, Query(ge=1, le=500)] = PAGE_SIZE,
) -> Response:
    visit = Visit.of(request)
    if visit.session is None:
        return visit.to_login()
    filters = {"status": status, "topic": topic.strip(), "group": group, "id": id.strip()}
    filters["limit"] = str(limit)
    if filters["id"]:
        if await visit.find(filters["id"]) is not None:
            return visit.redirect(f"/messages/{filters['id']}")
        return _list_page(visit, filters, [], None, f"No message has the id {id!r}.")
    problem = _bad_filter(filters)
    if problem:
        return _list_page(visit, filters, [], None, problem)
    page = await visit.runtime.usecases.page(
        status=MessageStatus(status) if status else None,
        topic=filters["topic"] or None,
        group=group or None,
        limit=limit,
        after=start_of(cursor),
    )
    next_cursor = page_cursor.encode(page.next_cursor)
    return _list_page(visit, filters, page.messages, next_cursor, None)


@router.get("/messages/{id}")
async def message(request: Request, id: str) -> Response:
    visit = Visit.of(request)
    if visit.session is None:
        return visit.to_login()
    found = await visit.find(id)
    if found is None:
        return visit.not_found(id)
    history = await visit.runtime.usecases.history(id)
    return visit.render("message.html", m=found, history=history, final=found.status in FINAL)


async def _overview(runtime: Runtime) -> dict[str, Any]:
    """Everything the overview shows, as JSON-ready values."""
    counts = await runtime.monitor.counts()
    return {
        "instance": instance_name(),
        "now": time.time(),
        "counts": counts,
        "broker": await runtime.broker_report(),
        "rates": runtime.monitor.rates(),
        "lag": runtime.monitor.lag,
        "groups": sorted(runtime.settings.groups),
    }


def _bad_filter(filters: dict[str, str]) -> str | None:
    if filters["status"] and filters["status"] not in MessageStatus._value2member_map_:
        return f"{filters['status']!r} is not a status."
    if filters["topic"] and not TOPIC_RE.fullmatch(filters["topic"]):
        return f"{filters['topic']!r} is not a topic."
    if filters["group"] and not NAME_RE.fullmatch(filters["group"]):
        return f"{filters['group']!r} is not a group name."
    return None


def _list_page(
    visit: Visit,
    filters: dict[str, str],
    messages: list[Message],
    next_cursor: str | None,
    problem: str | None,
) -> HTMLResponse:
    query = visit.request.query_params
    requeued, republished = query.get("requeued", ""), query.get("republished", "")
    return visit.render(
        "messages.html",
        status=404 if problem and filters["id"] else 200,
        filters=filters,
        messages=messages,
        next_cursor=next_cursor,
        problem=problem,
        requeued=int(requeued) if requeued.isdigit() else None,
        republished=int(republished) if republished.isdigit() else 0,
        statuses=list(MessageStatus),
        groups=sorted(visit.runtime.settings.groups),
    )
