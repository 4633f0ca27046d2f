"""Requeue from the dashboard: of one dead message, or of every dead delivery of a group,
each a POST carrying the session's CSRF token behind a confirmation page."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import Response

from reliable_msg.errors import ReliableMsgError
from reliable_msg.policy import TOPIC_RE
from reliable_msg.service.dashboard.visit import Visit
from reliable_msg.service.runtime import Runtime
from reliable_msg.states import MessageStatus

router = APIRouter(include_in_schema=False)


@router.get("/messages/{id}/requeue")
async def requeue_form(request: Request, id: str) -> Response:
    visit = Visit.of(request)
    if visit.session is None:
        return visit.to_login()
    found = await visit.find(id)
    if found is None:
        return visit.not_found(id)
    return visit.render("requeue.html", m=found, group=None, topic=None, dead=None)


@router.post("/messages/{id}/requeue")
async def requeue(request: Request, id: str, csrf: Annotated[str, Form()] = "") -> Response:
    visit = Visit.of(request)
    if refused := visit.refused(csrf):
        return refused
    try:
        moved = await visit.runtime.usecases.requeue(id)
    except ReliableMsgError as exc:
        found = await visit.find(id)
        if found is None:
            return visit.not_found(id)
        return visit.render(
            "requeue.html",
            status=exc.status,
            m=found,
            group=None,
            topic=None,
            dead=None,
            error=exc.message,
        )
    notice = "rechecked" if moved.status is MessageStatus.PENDING else "requeued"
    return visit.redirect(f"/messages/{id}?notice={notice}")


@router.get("/groups/{group}/requeue")
async def requeue_group_form(request: Request, group: str, topic: str = "") -> Response:
    visit = Visit.of(request)
    if visit.session is None:
        return visit.to_login()
    if group not in visit.runtime.settings.groups:
        return visit.not_found(None, f"No consumer group is called {group!r}.")
    dead = await _dead_deliveries(visit.runtime, group)
    return visit.render("requeue.html", m=None, group=group, topic=topic or None, dead=dead)


@router.post("/groups/{group}/requeue")
async def requeue_group(
    request: Request,
    group: str,
    csrf: Annotated[str, Form()] = "",
    topic: Annotated[str, Form()] = "",
) -> Response:
    visit = Visit.of(request)
    if refused := visit.refused(csrf):
        return refused
    if group not in visit.runtime.settings.groups:
        return visit.not_found(None, f"No consumer group is called {group!r}.")
    if topic and not TOPIC_RE.fullmatch(topic):
        return visit.not_found(None, f"{topic!r} is not a topic.")
    dead = await _dead_deliveries(visit.runtime, group)
    try:
        count = (await visit.runtime.usecases.requeue_all(topic or None, group)).requeued
    except ReliableMsgError as exc:
        return visit.render(
            "requeue.html",
            status=exc.status,
            m=None,
            group=group,
            topic=topic or None,
            dead=None,
            error=exc.message,
        )
    republished = max(0, dead - await _dead_deliveries(visit.runtime, group))
    return visit.redirect(f"/messages?group={group}&republished={republished}&requeued={count}")


async def _dead_deliveries(runtime: Runtime, group: str) -> int:
    counts = await runtime.monitor.counts(max_age=0)
    return int(counts["groups"].get(group, {}).get("dead", 0))
