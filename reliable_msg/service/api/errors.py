"""Every error the API answers, as ``{"error": {"code", "message"}}`` with the status of
its :class:`~reliable_msg.errors.Code`: ours, the framework's (invalid JSON, a body that
does not validate, an unknown path or method), a bug, and a request body over the limit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reliable_msg.errors import (
    BadRequest,
    Code,
    PayloadTooLarge,
    RateLimited,
    ReliableMsgError,
    Unprocessable,
)
from reliable_msg.service.schemas import ErrorOut

log = logging.getLogger(__name__)

#: The error answers of every call, for the OpenAPI schema.
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 413, 422, 503)
}

#: What every call that takes a token may also answer: the rate limit (``[limits]``).
LIMITED: dict[int | str, dict[str, Any]] = {
    429: {
        "model": ErrorOut,
        "description": "Too many requests for this credential (`rate_limited`)",
        "headers": {
            "Retry-After": {
                "description": "Seconds until the credential may send a request again",
                "required": True,
                "schema": {"type": "integer", "minimum": 1},
            }
        },
    }
}


def error_response(
    error: ReliableMsgError, headers: Mapping[str, str] | None = None, *, status: int | None = None
) -> JSONResponse:
    """The answer for ``error``: its code and message, with its status unless ``status``."""
    status = error.status if status is None else status
    headers = dict(headers or {})
    if status == 503:
        headers["Retry-After"] = "1"
    return JSONResponse(
        {"error": {"code": error.code, "message": error.message}},
        status_code=status,
        headers=headers,
    )


#: The codes of the errors the HTTP framework raises by status (any other is ``http_error``).
_FRAMEWORK_CODES = {404: Code.NOT_FOUND, 405: Code.METHOD_NOT_ALLOWED}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ReliableMsgError)
    async def _ours(_: Request, exc: ReliableMsgError) -> JSONResponse:
        headers = None
        if isinstance(exc, RateLimited):
            headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
        return error_response(exc, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(_not_json())
        problems = "; ".join(_describe(e) for e in errors[:10])
        return error_response(Unprocessable(problems, code=Code.INVALID_REQUEST))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI could not read the body: not UTF-8, too deep
            return error_response(_not_json())
        code = _FRAMEWORK_CODES.get(exc.status_code, Code.HTTP_ERROR)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Every method of the path, not just those of the first route that matched it.
            headers["Allow"] = ", ".join(_allowed_methods(request))
        error = code.error(str(exc.detail), code=code)
        return error_response(error, headers, status=exc.status_code)

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(ReliableMsgError("internal error; see the service log"))


def _not_json() -> BadRequest:
    return BadRequest("the request body is not valid JSON", code=Code.INVALID_JSON)


def _allowed_methods(request: Request) -> list[str]:
    """The methods some route of the app accepts for this request's path (RFC 9110 Allow)."""
    methods: set[str] = set()
    for route in request.app.state.api_routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match is not Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return sorted(methods)


def _describe(error: Any) -> str:
    loc = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
    return f"{loc}: {error.get('msg', 'invalid')}"


class BodyLimit:
    """Answers 413 for a request body over ``limit`` bytes, declared or streamed, before
    any route runs, whether or not the route reads a body."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > self.limit:
                await self._too_large(scope, receive, send)
                return
            # The server passes on no more than the declared length.
            await self.app(scope, receive, send)
            return
        # A body of unknown length (chunked): read it here, up to the limit; a route
        # that takes no body would never read it, and would run whatever its size.
        head: list[Message] = []
        seen = 0
        while True:
            message = await receive()
            head.append(message)
            if message["type"] != "http.request":  # the client went away
                break
            seen += len(message.get("body", b""))
            if seen > self.limit:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return head.pop(0) if head else await receive()

        await self.app(scope, replay, send)

    def _text(self) -> str:
        return f"request body over {self.limit} bytes"

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(PayloadTooLarge(self._text()))
        await response(scope, receive, send)
