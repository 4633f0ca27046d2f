"""The HTTP API (DESIGN §4): routes parse, authorise and call a use-case; no SQL here."""

from __future__ import annotations

import base64
import json
import logging
import math
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
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
from reliable_msg.message import Message as DomainMessage
from reliable_msg.message import NewMessage
from reliable_msg.policy import ID_RE
from reliable_msg.service import dashboard
from reliable_msg.service.auth import Principal, Role
from reliable_msg.service.runtime import Runtime
from reliable_msg.service.schemas import (
    AckOut,
    BatchOut,
    ErrorOut,
    GroupName,
    HealthOut,
    IdsIn,
    MessageId,
    MessageIn,
    MessageOut,
    PageOut,
    PrepareBatchIn,
    ReadyOut,
    RequeuedOut,
    Topic,
)
from reliable_msg.service.usecases import Acked, MessageService, Prepared, payload_text
from reliable_msg.states import DeliveryStatus, MessageStatus

log = logging.getLogger(__name__)
T = TypeVar("T")

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


def create_app(runtime: Runtime, *, manage: bool = False) -> FastAPI:
    """The FastAPI app over ``runtime``; with ``manage`` its lifespan starts and stops it."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if manage:
            await runtime.start()
        try:
            yield
        finally:
            if manage:
                await runtime.stop()

    app = FastAPI(
        title="reliable-msg",
        version="1",
        lifespan=lifespan,
        responses=ERRORS,
    )
    app.state.runtime = runtime
    app.add_middleware(BodyLimit, limit=runtime.settings.max_request_bytes)
    _install_error_handlers(app)
    v1, public = _routes()
    app.state.api_routes = [*v1.routes, *public.routes]  # for the Allow header of a 405
    app.include_router(v1)
    app.include_router(public)
    app.include_router(dashboard.router())
    return app


# -- dependencies ------------------------------------------------------------------------


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


# Dependencies are coroutines on purpose: FastAPI runs plain functions in a thread pool,
# a thread hop per dependency per request.


async def _service(request: Request) -> MessageService:
    return _runtime(request).service


def _role(*roles: Role) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """The dependency admitting a request whose token has one of ``roles``.

    One dependency rather than a role check over a shared token dependency: FastAPI
    resolves each per request, and the second cost the single-message API's hot routes
    about a tenth of their framework time.
    """

    async def admit(
        request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> Principal:
        address = request.client.host if request.client is not None else "unknown"
        # ``authorization`` documents the header in OpenAPI; the check reads every copy,
        # since FastAPI hands over only the first.
        every = request.headers.getlist("authorization")
        return _runtime(request).auth.admit(every, address).require(*roles)

    return admit


Service = Annotated[MessageService, Depends(_service)]
Producer = Annotated[Principal, Depends(_role(Role.PRODUCER))]
Group = Annotated[Principal, Depends(_role(Role.GROUP))]
Admin = Annotated[Principal, Depends(_role(Role.ADMIN))]
Reader = Annotated[Principal, Depends(_role(Role.PRODUCER, Role.ADMIN))]
PathId = Annotated[MessageId, Path()]


# -- routes ------------------------------------------------------------------------------


def _routes() -> tuple[Any, Any]:  # noqa: C901 - a flat list of small route functions
    """The ``/v1`` calls, which take a token, and the probes, which do not."""
    from fastapi import APIRouter

    v1 = APIRouter(responses=LIMITED)  # every /v1 call takes a token

    @v1.post("/v1/messages", status_code=201, response_model=MessageOut)
    async def prepare(body: MessageIn, who: Producer, service: Service) -> Response:
        [result] = await service.prepare(who.name, [_new(body)])
        prepared = _raise_or(result, Prepared)
        return fast_json(message_json(prepared.message), 201 if prepared.created else 200)

    @v1.post("/v1/messages/{id}/confirm", response_model=MessageOut)
    async def confirm(id: PathId, who: Producer, service: Service) -> Response:
        [result] = await service.confirm(who.name, [id])
        return fast_json(message_json(_raise_or_message(result)))

    @v1.post("/v1/messages/{id}/cancel", response_model=MessageOut)
    async def cancel(id: PathId, who: Producer, service: Service) -> Response:
        [result] = await service.cancel(who.name, [id])
        return fast_json(message_json(_raise_or_message(result)))

    @v1.post("/v1/messages/{id}/ack", response_model=AckOut)
    async def ack(id: PathId, who: Group, service: Service) -> Response:
        [result] = await service.ack(who.name, [id])
        acked = _raise_or(result, Acked)
        return fast_json({"id": acked.id, "group": acked.group, "status": DeliveryStatus.DONE})

    @v1.post("/v1/batch/prepare", response_model=BatchOut)
    async def prepare_batch(
        body: PrepareBatchIn, who: Producer, service: Service, request: Request
    ) -> Response:
        items = [_new(m) for m in body.messages]
        _check_batch(request, [n.id for n in items])
        results = await service.prepare(who.name, items)
        return _batch([n.id for n in items], results)

    @v1.post("/v1/batch/confirm", response_model=BatchOut)
    async def confirm_batch(
        body: IdsIn, who: Producer, service: Service, request: Request
    ) -> Response:
        _check_batch(request, body.ids)
        return _batch(body.ids, await service.confirm(who.name, body.ids))

    @v1.post("/v1/batch/cancel", response_model=BatchOut)
    async def cancel_batch(
        body: IdsIn, who: Producer, service: Service, request: Request
    ) -> Response:
        _check_batch(request, body.ids)
        return _batch(body.ids, await service.cancel(who.name, body.ids))

    @v1.post("/v1/batch/ack", response_model=BatchOut)
    async def ack_batch(body: IdsIn, who: Group, service: Service, request: Request) -> Response:
        _check_batch(request, body.ids)
        return _batch(body.ids, await service.ack(who.name, body.ids))

    @v1.get("/v1/messages/{id}", response_model=MessageOut)
    async def get_message(id: PathId, who: Reader, service: Service) -> MessageOut:
        owner = who.name if who.role is Role.PRODUCER else None
        return MessageOut.of(await service.get(id, owner), deliveries=True)

    @v1.get("/v1/messages", response_model=PageOut)
    async def list_messages(
        _: Admin,
        service: Service,
        status: MessageStatus | None = None,
        topic: Topic | None = None,
        group: GroupName | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        cursor: str | None = None,
    ) -> PageOut:
        page = await service.page(
            status=status, topic=topic, group=group, limit=limit, after=_decode_cursor(cursor)
        )
        return PageOut(
            messages=[MessageOut.of(m) for m in page.messages],
            next_cursor=_encode_cursor(page.next_cursor),
        )

    @v1.post("/v1/messages/{id}/requeue", response_model=MessageOut)
    async def requeue(id: PathId, _: Admin, service: Service) -> MessageOut:
        return MessageOut.of(await service.requeue(id))

    @v1.post("/v1/requeue", response_model=RequeuedOut)
    async def requeue_all(
        _: Admin,
        service: Service,
        request: Request,
        topic: Topic | None = None,
        group: GroupName | None = None,
    ) -> RequeuedOut:
        if group is not None and group not in _runtime(request).settings.groups:
            raise Unprocessable(f"no consumer group {group!r}", code=Code.UNKNOWN_GROUP)
        done = await service.requeue_all(topic, group)
        return RequeuedOut(requeued=done.requeued, refused=done.refused)

    @v1.get("/v1/stats")
    async def stats(_: Admin, service: Service, request: Request) -> dict[str, Any]:
        stats = await service.stats()
        stats["broker"] = await _runtime(request).broker_report()
        return stats

    public = APIRouter()

    @public.get("/healthz", response_model=HealthOut)
    async def healthz() -> HealthOut:
        return HealthOut(status="ok")

    @public.get("/readyz", response_model=ReadyOut, responses={503: {"model": ReadyOut}})
    async def readyz(request: Request) -> JSONResponse:
        report = await _runtime(request).readiness()
        # Degraded, the service works without RabbitMQ as long as Redis answers.
        path = report["redis"] if report["mode"] == "degraded" else report["rabbitmq"]
        ready = report["postgres"] == "ok" and path == "ok"
        report["status"] = "ready" if ready else "not_ready"
        return JSONResponse(ReadyOut(**report).model_dump(), status_code=200 if ready else 503)

    @public.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return v1, public


def _new(body: MessageIn) -> NewMessage:
    return NewMessage(
        id=body.id or uuid.uuid4().hex,
        topic=body.topic,
        payload=payload_text(body.payload),
        headers=dict(body.headers),
        key=body.key,
    )


def _check_batch(request: Request, ids: Sequence[str]) -> None:
    limit = _runtime(request).settings.max_batch
    if len(ids) > limit:
        raise PayloadTooLarge(f"a batch holds at most {limit} items; this one has {len(ids)}")
    if len(set(ids)) != len(ids):
        raise Unprocessable("a batch names the same id twice", code=Code.DUPLICATE_ID)


def _raise_or(result: T | ReliableMsgError, kind: type[T]) -> T:
    if isinstance(result, ReliableMsgError):
        raise result
    return result


def _raise_or_message(result: ReliableMsgError | DomainMessage) -> DomainMessage:
    return _raise_or(result, DomainMessage)


def _item(id: str, result: Any) -> dict[str, Any]:
    """One batch result, shaped as :class:`ItemOut`."""
    if isinstance(result, ReliableMsgError):
        error = {"code": result.code, "message": result.message}
        return {"id": id, "ok": False, "status": None, "created": None, "error": error}
    done_at = None
    if isinstance(result, Prepared):
        status, created = result.message.status.value, result.created
    elif isinstance(result, Acked):
        status, created, done_at = DeliveryStatus.DONE.value, None, result.done_at
    else:
        status, created = result.status.value, None
    item = {"id": id, "ok": True, "status": status, "created": created, "error": None}
    return {**item, "done_at": done_at} if done_at else item


def _batch(ids: Sequence[str], results: Sequence[Any]) -> Response:
    return fast_json({"results": [_item(i, r) for i, r in zip(ids, results, strict=True)]})


def message_json(m: DomainMessage) -> dict[str, Any]:
    """A message shaped as :class:`MessageOut` (no deliveries), its payload spliced in as
    the JSON text it is stored as rather than parsed and written again."""
    return {
        "id": m.id,
        "topic": m.topic,
        "producer": m.producer,
        "status": m.status.value,
        "payload": orjson.Fragment(m.payload),
        "headers": m.headers,
        "key": m.key,
        "groups": list(m.groups),
        "check_attempts": m.check_attempts,
        "last_error": m.last_error,
        "created_at": m.created_at,
        "updated_at": m.updated_at,
        "sent_at": m.sent_at,
        "finished_at": m.finished_at,
        "deliveries": None,
    }


def fast_json(content: Any, status: int = 200) -> Response:
    """A JSON response written by orjson, skipping FastAPI's re-validation of a body the
    route built itself (the route's ``response_model`` still documents it)."""
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


def _encode_cursor(cursor: tuple[datetime, str] | None) -> str | None:
    if cursor is None:
        return None
    raw = json.dumps([cursor[0].isoformat(), cursor[1]]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str | None) -> tuple[datetime, str] | None:
    if not cursor:
        return None
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        at, id = json.loads(base64.urlsafe_b64decode(padded))
        if not isinstance(id, str) or not ID_RE.fullmatch(id):
            raise ValueError("not a message id")
        # in UTC here, so that a date out of range fails here rather than in asyncpg
        return datetime.fromisoformat(at).astimezone(UTC), id
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadRequest("cursor is not one this service handed out", code=Code.BAD_CURSOR) from exc


# -- errors ------------------------------------------------------------------------------


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


def _install_error_handlers(app: FastAPI) -> None:
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
