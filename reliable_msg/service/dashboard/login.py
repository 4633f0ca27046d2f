"""Logging in to the dashboard with the admin token, and out; failed logins are limited
per client address."""

from __future__ import annotations

import math
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from reliable_msg.metrics import RATE_LIMITED
from reliable_msg.service.dashboard.session import COOKIE
from reliable_msg.service.dashboard.visit import (
    PREFIX,
    SECURITY_HEADERS,
    Visit,
    disabled,
    safe_next,
)

router = APIRouter(include_in_schema=False)


@router.get("/login")
async def login_form(request: Request, next: str = "") -> Response:
    visit = Visit.of(request)
    if not visit.runtime.settings.dashboard.enabled:
        return disabled()
    if visit.session is not None:
        return visit.redirect("/")
    return visit.render("login.html", next=next, error=None, enabled=visit.sessions.enabled)


@router.post("/login")
async def login(
    request: Request,
    token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "",
) -> Response:
    visit = Visit.of(request)
    if not visit.runtime.settings.dashboard.enabled:
        return disabled()
    # Keyed by the client address uvicorn gives (X-Forwarded-For only from a trusted
    # proxy); checked before the token, so that a guess over the limit learns nothing.
    address = request.client.host if request.client is not None else "unknown"
    logins = visit.runtime.auth.logins
    wait = logins.wait(address)
    if wait:
        return _too_many_logins(visit, next, wait)
    if not visit.sessions.login(token):
        logins.take(address)
        return visit.render(
            "login.html",
            status=401,
            next=next,
            error="That is not the admin token.",
            enabled=visit.sessions.enabled,
        )
    target = next if safe_next(next, visit.base) else visit.base + "/"
    response = RedirectResponse(target, status_code=303)
    response.headers.update(SECURITY_HEADERS)  # no-store above all: it sets the session
    response.set_cookie(
        COOKIE,
        visit.sessions.issue(),
        max_age=int(visit.sessions.ttl),
        path=PREFIX,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout")
async def logout(request: Request, csrf: Annotated[str, Form()] = "") -> Response:
    visit = Visit.of(request)
    # Without a session (it ended in an old tab) it is logged out already: not the login
    # form, which would send back here after the login, and here is a POST only.
    if visit.session is not None and (refused := visit.refused(csrf)):
        return refused
    response = visit.redirect("/login?notice=logged_out")
    response.delete_cookie(COOKIE, path=PREFIX, httponly=True, samesite="strict")
    return response


def _too_many_logins(visit: Visit, next: str, wait: float) -> HTMLResponse:
    retry = max(1, math.ceil(wait))
    RATE_LIMITED.labels("anonymous").inc()
    response = visit.render(
        "login.html",
        status=429,
        next=next,
        error=f"Too many failed logins from your address: try again in {retry} s.",
        enabled=visit.sessions.enabled,
    )
    response.headers["Retry-After"] = str(retry)
    return response
