"""The dashboard's routes, under ``/dashboard``: its static files here, and the pages
(:mod:`.pages`), logging in (:mod:`.login`), requeueing (:mod:`.requeue`) and the TCC
transactions (:mod:`.tcc`).

Routes check the session, parse, and call the use-cases (a message's history too, and
the TCC coordinator's), the monitor and the runtime's broker report; no SQL here. Pages
are Jinja2 templates rendered on the server; ``static/dashboard.js`` polls
``api/overview`` and draws the chart, and reloads a message's or a transaction's page
when it moves. Every state change is a POST carrying the session's CSRF token, reached through
a confirmation page.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import Response

from reliable_msg.service.dashboard import login, pages, requeue, tcc
from reliable_msg.service.dashboard.visit import PREFIX, Visit

#: Files served from ``static/``, with their content types.
STATIC = {"dashboard.css": "text/css", "dashboard.js": "text/javascript"}

_own = APIRouter(include_in_schema=False)


@_own.get("")
async def root(request: Request) -> Response:
    return Visit.of(request).redirect("/")


@_own.get("/static/{name}")
async def static(name: str) -> Response:
    if name not in STATIC:
        return Response("not found", status_code=404, media_type="text/plain")
    body = resources.files(__package__).joinpath("static", name).read_bytes()
    return Response(body, media_type=STATIC[name], headers={"Cache-Control": "no-cache"})


def router() -> APIRouter:
    """The dashboard's routes, under ``/dashboard``."""
    r = APIRouter(include_in_schema=False)
    for part in (_own, login.router, pages.router, requeue.router, tcc.router):
        r.include_router(part, prefix=PREFIX)
    return r
