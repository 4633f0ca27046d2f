"""The :class:`Participant`: its Try, Confirm and Cancel handlers, run behind the barrier
in the participant's own database transaction, and the router the coordinator and the
initiator call."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import cast

import asyncpg
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from reliable_msg.errors import (
    Code,
    ConfigError,
    Conflict,
    PayloadTooLarge,
    Refused,
    ReliableMsgError,
    RequestError,
)
from reliable_msg.tcc import Op

from .barrier import Passage, cross
from .call import Call, authenticate, parse_call

log = logging.getLogger("reliable_msg.sdk.tcc")

#: What a handler is: ``async def handler(conn, call) -> None``, run in ``conn``'s
#: transaction together with the call's barrier row.
Handler = Callable[[asyncpg.Connection, Call], Awaitable[None]]

#: The default bound of a call's body, in bytes (answered 413 above it): the
#: coordinator's default ``tcc.max_payload_bytes`` (64 KiB of compact JSON) and room for
#: the rest of the call (gid, branch, op), so that every payload it takes gets through.
MAX_BODY = 65 * 1024


class Participant:
    """A TCC participant: one handler per op, each run exactly once per branch.

    ::

        p = Participant(pool, TOKEN, name="inventory")

        @p.on_try
        async def freeze(conn, call): ...

        app.include_router(p.router("/tcc/inventory"))

    The answers: 200 done (also for a call done already, and for a Cancel whose Try never
    came), 409 on a Try its handler refused (:class:`Refused`, code ``refused``) or that
    came after its Cancel (``cancelled_before_try``), 500 when a handler or the database
    failed (rolled back: the caller retries), 400, 401 or 413 for a call that is refused
    before anything runs.
    """

    def __init__(
        self, pool: asyncpg.Pool, token: str, *, name: str = "participant", max_body: int = MAX_BODY
    ) -> None:
        self._pool = pool
        self._token = token
        self.name = name
        self._max_body = max_body
        self._handlers: dict[Op, Handler] = {}

    def on_try(self, handler: Handler) -> Handler:
        """Register the Try handler: reserve (freeze stock, say); raise :class:`Refused`
        to refuse for a business reason."""
        return self._register(Op.TRY, handler)

    def on_confirm(self, handler: Handler) -> Handler:
        """Register the Confirm handler: make the Try's reservation final."""
        return self._register(Op.CONFIRM, handler)

    def on_cancel(self, handler: Handler) -> Handler:
        """Register the Cancel handler: give the Try's reservation back. It runs only
        after a Try that took effect."""
        return self._register(Op.CANCEL, handler)

    def _register(self, op: Op, handler: Handler) -> Handler:
        if op in self._handlers:
            raise ConfigError(f"participant {self.name}: a second {op.value} handler")
        self._handlers[op] = handler
        return handler

    def router(self, prefix: str = "") -> APIRouter:
        """A FastAPI router with ``POST {prefix}/try``, ``/confirm`` and ``/cancel``;
        :class:`ConfigError` unless all three handlers are registered."""
        missing = [op.value for op in Op if op not in self._handlers]
        if missing:
            raise ConfigError(f"participant {self.name}: no handler for {', '.join(missing)}")
        router = APIRouter(prefix=prefix)
        for op in Op:
            router.add_api_route(f"/{op.value}", self._endpoint(op), methods=["POST"])
        return router

    def _endpoint(self, op: Op) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return await self.answer(op, request)

        endpoint.__name__ = f"tcc_{op.value}"
        return endpoint

    async def answer(self, op: Op, request: Request) -> Response:
        """The answer to one HTTP call of ``op``."""
        try:
            gid, branch = authenticate(self._token, op, request.headers)
            call = parse_call(op, gid, branch, await self._read(request))
        except RequestError as exc:
            return _error(exc)
        return await self.run(call)

    async def _read(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_body:
            raise _too_large(self._max_body)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self._max_body:
                raise _too_large(self._max_body)
        return bytes(body)

    async def run(self, call: Call) -> Response:
        """Run ``call`` behind the barrier in one transaction; its answer."""
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                passage = await cross(conn, call.gid, call.branch, call.op)
                if passage is Passage.RUN:
                    await self._handlers[call.op](cast(asyncpg.Connection, conn), call)
        except Refused as exc:
            if call.op is Op.TRY:
                self._log(logging.INFO, call, "refused: %s", exc.message)
                return _error(exc)
            self._log(logging.ERROR, call, "raised Refused, which only a Try may", exc=exc)
            return _error(ReliableMsgError(f"the {call.op.value} handler failed"))
        except Exception as exc:
            self._log(logging.ERROR, call, "failed; rolled back", exc=exc)
            return _error(ReliableMsgError(f"the {call.op.value} handler failed"))
        if passage is Passage.HANGING:
            self._log(logging.INFO, call, "refused: its Cancel came first")
            return _error(
                Conflict("the branch was cancelled before this Try", code=Code.CANCELLED_BEFORE_TRY)
            )
        if passage is not Passage.RUN:
            self._log(logging.INFO, call, "%s", passage.value.replace("_", " "))
        return JSONResponse({"outcome": "done" if passage is Passage.RUN else passage.value})

    def _log(
        self, level: int, call: Call, message: str, *args: object, exc: Exception | None = None
    ) -> None:
        log.log(
            level,
            "tcc participant %s: %s of %s/%s " + message,
            self.name,
            call.op.value,
            call.gid,
            call.branch,
            *args,
            exc_info=exc,
            extra={"gid": call.gid, "branch": call.branch, "op": call.op.value},
        )


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the body is over {limit} bytes")


def _error(error: ReliableMsgError) -> JSONResponse:
    """The service's error answer: ``{"error": {"code", "message"}}`` with its status."""
    return JSONResponse(
        {"error": {"code": str(error.code), "message": error.message}}, status_code=error.status
    )
