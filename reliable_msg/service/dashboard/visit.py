"""One request to the dashboard: who asks (the session), what it can reach (the runtime),
and the pages it can be answered with (templates, redirects, error pages)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.templating import Jinja2Templates

from reliable_msg.errors import BadRequest, NotFound
from reliable_msg.message import Message
from reliable_msg.policy import ID_RE
from reliable_msg.service import cursor as page_cursor
from reliable_msg.service.dashboard.session import COOKIE, Session, Sessions
from reliable_msg.service.runtime import Runtime, instance_name

#: Where the dashboard is mounted.
PREFIX = "/dashboard"
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
    "retried": "Retried now: its unfinished branches are called at once.",
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
class Visit:
    """One request to the dashboard: who asks, and what it can reach."""

    request: Request
    runtime: Runtime
    sessions: Sessions
    session: Session | None

    @classmethod
    def of(cls, request: Request) -> Visit:
        runtime: Runtime = request.app.state.runtime
        settings = runtime.settings
        token = settings.admin_token.get_secret_value() if settings.admin_token else None
        sessions = Sessions(token, settings.dashboard.session_ttl)
        enabled = settings.dashboard.enabled
        session = sessions.verify(request.cookies.get(COOKIE)) if enabled else None
        return cls(request, runtime, sessions, session)

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
        query = f"?next={quote(wanted)}" if safe_next(wanted, self.base) else ""
        return self.redirect("/login" + query)

    async def find(self, id: str) -> Message | None:
        """The message ``id``, or None for an unknown id or one that is not an id."""
        if not ID_RE.fullmatch(id):
            return None
        try:
            return await self.runtime.usecases.get(id, None)
        except NotFound:
            return None

    def not_found(self, id: str | None, text: str | None = None) -> HTMLResponse:
        return self.render("error.html", status=404, text=text or f"No message has the id {id!r}.")

    def refused(self, csrf: str) -> Response | None:
        """The answer to a POST that may not act: the login page without a session, 403
        without the session's CSRF token; None when it may act."""
        if self.session is None:
            return self.to_login()
        if not self.sessions.check_csrf(self.session, csrf):
            return self.forbidden()
        return None

    def forbidden(self) -> HTMLResponse:
        text = "This form is stale or was not sent by this dashboard; reload the page and retry."
        return self.render("error.html", status=403, text=text)


def start_of(cursor: str) -> page_cursor.Position | None:
    """Where a list's page starts: after ``cursor``, or the first page for an edited or
    stale link."""
    try:
        return page_cursor.decode(cursor)
    except BadRequest:
        return None


def safe_next(path: str, base: str) -> bool:
    """Only a dashboard page may be a redirect target after login (no open redirect)."""
    return path.startswith(base + "/") and "//" not in path and "\\" not in path


def disabled() -> Response:
    return Response("the dashboard is disabled", status_code=404, media_type="text/plain")
