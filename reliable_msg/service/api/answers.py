"""The JSON answers routes write themselves: a message, a batch's results, and the
limits a batch is checked against first."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import orjson
from fastapi import Request, Response

from reliable_msg.errors import Code, PayloadTooLarge, ReliableMsgError, Unprocessable
from reliable_msg.message import Message
from reliable_msg.service.api.deps import runtime_of
from reliable_msg.service.usecases import Acked, Prepared
from reliable_msg.states import DeliveryStatus

T = TypeVar("T")


def fast_json(content: Any, status: int = 200) -> Response:
    """A JSON response written by orjson, skipping FastAPI's re-validation of a body the
    route built itself (the route's ``response_model`` still documents it)."""
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


def message_json(m: Message) -> dict[str, Any]:
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


def raise_or(result: T | ReliableMsgError, kind: type[T]) -> T:
    """The one result of a single call, or its error raised."""
    if isinstance(result, ReliableMsgError):
        raise result
    return result


def check_batch(request: Request, ids: Sequence[str]) -> None:
    limit = runtime_of(request).settings.max_batch
    if len(ids) > limit:
        raise PayloadTooLarge(f"a batch holds at most {limit} items; this one has {len(ids)}")
    if len(set(ids)) != len(ids):
        raise Unprocessable("a batch names the same id twice", code=Code.DUPLICATE_ID)


def batch(ids: Sequence[str], results: Sequence[Any]) -> Response:
    """A batch's answer: one result per item, in order."""
    return fast_json({"results": [_item(i, r) for i, r in zip(ids, results, strict=True)]})


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
