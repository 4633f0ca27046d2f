"""The dashboard's routes: HTML pages, the JSON its script polls, and its static files.

Routes check the session, parse, and call the service, the store's history, the
monitor and the runtime's broker report; no SQL here. Pages are Jinja2 templates
rendered on the server; ``static/dashboard.js`` polls ``api/overview`` and draws the
chart. Every state change is a POST carrying the session's CSRF token, reached through
a confirmation page.
"""

from __future__ import annotations

import base64
import json
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Annotated, Any
from urllib.parse import quote

import jinja2
from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.templating import Jinja2Templates

from reliable_msg.errors import NotFound, ReliableMsgError
from reliable_msg.message import Message
from reliable_msg.metrics import RATE_LIMITED
from reliable_msg.policy import ID_RE, NAME_RE, TOPIC_RE
from reliable_msg.service.dashboard.session import COOKIE, Session, Sessions
from reliable_msg.service.runtime import Runtime, instance_name
from reliable_msg.states import FINAL, MessageStatus

#: Where the dashboard is mounted.
PREFIX = "/dashboard"
#: Messages per page of the list, unless the URL says ``limit`` (up to 500).
PAGE_SIZE = 50
#: Files served from ``static/``, with their content types.
STATIC = {"dashboard.css": "text/css", "dashboard.js": "text/javascript"}
#: Sent with every page: no inline script or style, nothing from another origin.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
#: The notices a redirect may ask a page to show (never text taken from the URL).
NOTICES = {
    "requeued": "Requeued: its dead deliveries were republished.",
    "rechecked": "Requeued: check-back asks the producer again.",
    "logged_out": "You are logged out.",
}

_templates = Jinja2Templates(
    env=jinja2.Environment(
        loader=jinja2.PackageLoader("reliable_msg.service.dashboard", "templates"),
        autoescape=jinja2.select_autoescape(default=True),
        undefined=jinja2.StrictUndefined,
    )
)


def _when(value: datetime | float | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, int | float):
        value = datetime.fromtimestamp(value, UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _precise(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def _pretty(text: str) -> str:
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return text


_templates.env.filters["when"] = _when
_templates.env.filters["pretty"] = _pretty
_templates.env.filters["precise"] = _precise


@dataclass(frozen=True, slots=True)
class _Visit:
    """One request to the dashboard: who asks, and what it can reach."""

    request: Request
    runtime: Runtime
    sessions: Sessions
    session: Session | None

    @property
    def base(self) -> str:
        return str(self.request.scope.get("root_path", "")) + PREFIX

    def render(self, template: str, *, status: int = 200, **values: Any) -> HTMLResponse:
        context = {
            "base": self.base,
            "csrf": self.sessions.csrf(self.session) if self.session else "",
            "notice": NOTICES.get(self.request.query_params.get("notice", "")),
            "mode": self.runtime.mode,
            "instance": instance_name(),
            **values,
        }
        response = _templates.TemplateResponse(self.request, template, context, status)
        response.headers.update(SECURITY_HEADERS)
        return response

    def redirect(self, path: str) -> RedirectResponse:
        response = RedirectResponse(self.base + path, status_code=303)
        response.headers.update(SECURITY_HEADERS)
        return response

    def to_login(self) -> RedirectResponse:
        wanted = self.request.url.path
        query = f"?next={quote(wanted)}" if _safe_next(wanted, self.base) else ""
        return self.redirect("/login" + query)


def _visit(request: Request) -> _Visit:
    runtime: Runtime = request.app.state.runtime
    settings = runtime.settings
    token = settings.admin_token.get_secret_value() if settings.admin_token else None
    sessions = Sessions(token, settings.dashboard.session_ttl)
    session = sessions.verify(request.cookies.get(COOKIE)) if settings.dashboard.enabled else None
    return _Visit(request, runtime, sessions, session)


def _safe_next(path: str, base: str) -> bool:
    """Only a dashboard page may be a redirect target after login (no open redirect)."""
    return path.startswith(base + "/") and "//" not in path and "\\" not in path


def _encode_cursor(cursor: tuple[datetime, str] | None) -> str | None:
    if cursor is None:
        return None
    raw = f"{cursor[0].isoformat()}|{cursor[1]}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str] | None:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, id = raw.split("|", 1)
        if not ID_RE.fullmatch(id):
            return None
        return datetime.fromisoformat(at).astimezone(UTC), id
    except (ValueError, UnicodeDecodeError):
        return None


def router() -> APIRouter:  # noqa: C901 - a flat list of small route functions
    """The dashboard's routes, under ``/dashboard``."""
    r = APIRouter(prefix=PREFIX, include_in_schema=False)

    @r.get("")
    async def root(request: Request) -> Response:
        return _visit(request).redirect("/")

    @r.get("/static/{name}")
    async def static(name: str) -> Response:
        if name not in STATIC:
            return Response("not found", status_code=404, media_type="text/plain")
        body = resources.files(__package__).joinpath("static", name).read_bytes()
        return Response(body, media_type=STATIC[name], headers={"Cache-Control": "no-cache"})

    @r.get("/login")
    async def login_form(request: Request, next: str = "") -> Response:
        visit = _visit(request)
        if not visit.runtime.settings.dashboard.enabled:
            return _disabled()
        if visit.session is not None:
            return visit.redirect("/")
        return visit.render("login.html", next=next, error=None, enabled=visit.sessions.enabled)

    @r.post("/login")
    async def login(
        request: Request,
        token: Annotated[str, Form()] = "",
        next: Annotated[str, Form()] = "",
    ) -> Response:
        visit = _visit(request)
        if not visit.runtime.settings.dashboard.enabled:
            return _disabled()
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
        target = next if _safe_next(next, visit.base) else visit.base + "/"
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

    @r.post("/logout")
    async def logout(request: Request, csrf: Annotated[str, Form()] = "") -> Response:
        visit = _visit(request)
        if visit.session is None:
            return visit.to_login()
        if not visit.sessions.check_csrf(visit.session, csrf):
            return _forbidden(visit)
        response = visit.redirect("/login?notice=logged_out")
        response.delete_cookie(COOKIE, path=PREFIX, httponly=True, samesite="strict")
        return response

    @r.get("/")
    async def overview(request: Request) -> Response:
        visit = _visit(request)
        if visit.session is None:
            return visit.to_login()
        data = await _overview(visit.runtime)
        poll = max(1.0, min(visit.runtime.settings.monitor.interval, 30.0))
        return visit.render("overview.html", data=data, poll=poll, statuses=list(MessageStatus))

    @r.get("/api/overview")
    async def overview_json(request: Request) -> Response:
        visit = _visit(request)
        if visit.session is None:
            return JSONResponse({"error": "login required"}, status_code=401)
        return JSONResponse(await _overview(visit.runtime), headers={"Cache-Control": "no-store"})

    @r.get("/api/messages/{id}")
    async def message_json(request: Request, id: str) -> Response:
        visit = _visit(request)
        if visit.session is None:
            return JSONResponse({"error": "login required"}, status_code=401)
        found = await _find(visit.runtime, id)
        if found is None:
            return JSONResponse({"error": "no such message"}, status_code=404)
        return JSONResponse({"id": found.id, "status": found.status.value})

    @r.get("/messages")
    async def messages(
        request: Request,
        status: str = "",
        topic: str = "",
        group: str = "",
        id: str = "",
        cursor: str = "",
        limit: Annotated[int, Query(ge=1, le=500)] = PAGE_SIZE,
    ) -> Response:
        visit = _visit(request)
        if visit.session is None:
            return visit.to_login()
        filters = {"status": status, "topic": topic.strip(), "group": group, "id": id.strip()}
        filters["limit"] = str(limit)
        if filters["id"]:
            if await _find(visit.runtime, filters["id"]) is not None:
                return visit.redirect(f"/messages/{filters['id']}")
            return _list_page(visit, filters, [], None, f"No message has the id {id!r}.")
        problem = _bad_filter(filters)
        if problem:
            return _list_page(visit, filters, [], None, problem)
        after = _decode_cursor(cursor) if cursor else None
        page = await visit.runtime.service.page(
            status=MessageStatus(status) if status else None,
            topic=filters["topic"] or None,
            group=group or None,
            limit=limit,
            after=after,
        )
        return _list_page(visit, filters, page.messages, _encode_cursor(page.next_cursor), None)

    @r.get("/messages/{id}")
    async def message(request: Request, id: str) -> Response:
        visit = _visit(request)
        if visit.session is None:
            return visit.to_login()
        found = await _find(visit.runtime, id)
        if found is None:
            return _not_found(visit, id)
        history = await visit.runtime.service.history(id)
        return visit.render("message.html", m=found, history=history, final=found.status in FINAL)

    @r.get("/messages/{id}/requeue")
    async def requeue_form(request: Request, id: str) -> Response:
        visit = _visit(request)
        if visit.session is None:
            return visit.to_login()
        found = await _find(visit.runtime, id)
        if found is None:
            return _not_found(visit, id)
        return visit.render("requeue.html", m=found, group=None, topic=None, dead=None)

    @r.post("/messages/{id}/requeue")
    async def requeue(request: Request, id: str, csrf: Annotated[str, Form()] = "") -> Response:
        visit = _visit(request)
        if visit.session is None:
            return visit.to_login()
        if not visit.sessions.check_csrf(visit.session, csrf):
            return _forbidden(visit)
        try:
            moved = await visit.runtime.service.requeue(id)
        except ReliableMsgError as exc:
            found = await _find(visit.runtime, id)
            if found is None:
                return _not_found(visit, id)
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

    @r.get("/groups/{group}/requeue")
    async def requeue_group_form(request: Request, group: str, topic: str = "") -> Response:
        visit = _visit(request)
        if visit.session is None:
            return visit.to_login()
        if group not in visit.runtime.settings.groups:
            return _not_found(visit, None, f"No consumer group is called {group!r}.")
        dead = await _dead_deliveries(visit.runtime, group)
        return visit.render("requeue.html", m=None, group=group, topic=topic or None, dead=dead)

    @r.post("/groups/{group}/requeue")
    async def requeue_group(
        request: Request,
        group: str,
        csrf: Annotated[str, Form()] = "",
        topic: Annotated[str, Form()] = "",
    ) -> Response:
        visit = _visit(request)
        if visit.session is None:
            return visit.to_login()
        if not visit.sessions.check_csrf(visit.session, csrf):
            return _forbidden(visit)
        if group not in visit.runtime.settings.groups:
            return _not_found(visit, None, f"No consumer group is called {group!r}.")
        if topic and not TOPIC_RE.fullmatch(topic):
            return _not_found(visit, None, f"{topic!r} is not a topic.")
        dead = await _dead_deliveries(visit.runtime, group)
        try:
            count = (await visit.runtime.service.requeue_all(topic or None, group)).requeued
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

    return r


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


async def _dead_deliveries(runtime: Runtime, group: str) -> int:
    counts = await runtime.monitor.counts(max_age=0)
    return int(counts["groups"].get(group, {}).get("dead", 0))


async def _find(runtime: Runtime, id: str) -> Message | None:
    if not ID_RE.fullmatch(id):
        return None
    try:
        return await runtime.service.get(id, None)
    except NotFound:
        return None


def _bad_filter(filters: dict[str, str]) -> str | None:
    if filters["status"] and filters["status"] not in MessageStatus._value2member_map_:
        return f"{filters['status']!r} is not a status."
    if filters["topic"] and not TOPIC_RE.fullmatch(filters["topic"]):
        return f"{filters['topic']!r} is not a topic."
    if filters["group"] and not NAME_RE.fullmatch(filters["group"]):
        return f"{filters['group']!r} is not a group name."
    return None


def _list_page(
    visit: _Visit,
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


def _not_found(visit: _Visit, id: str | None, text: str | None = None) -> HTMLResponse:
    return visit.render("error.html", status=404, text=text or f"No message has the id {id!r}.")


def _too_many_logins(visit: _Visit, next: str, wait: float) -> HTMLResponse:
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


def _forbidden(visit: _Visit) -> HTMLResponse:
    text = "This form is stale or was not sent by this dashboard; reload the page and retry."
    return visit.render("error.html", status=403, text=text)


def _disabled() -> Response:
    return Response("the dashboard is disabled", status_code=404, media_type="text/plain")
