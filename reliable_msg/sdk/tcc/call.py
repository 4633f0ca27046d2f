"""One call of a branch's Try, Confirm or Cancel as the participant receives it, and the
pure checks that turn an HTTP request into one (see :mod:`reliable_msg.tcc`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from reliable_msg.errors import BadRequest, Code, Unauthorized
from reliable_msg.policy import ID_RE
from reliable_msg.tcc import BRANCH_HEADER, GID_HEADER, OP_HEADER, Op, proof_matches

#: The longest gid or branch id taken.
MAX_ID_LENGTH = 200


@dataclass(frozen=True)
class Call:
    """A call handed to a handler: which branch of which global transaction, which op,
    and the payload the initiator registered for the branch."""

    gid: str
    branch: str
    op: Op
    payload: Any


def authenticate(token: str, op: Op, headers: Mapping[str, str]) -> tuple[str, str]:
    """The ``(gid, branch)`` the headers name, once they prove the call ``op`` at this
    path: :class:`Unauthorized` without the headers or the proof, or with a wrong proof;
    :class:`BadRequest` for malformed ids or another op than the path's. ``headers``
    looks names up case-insensitively (Starlette's do)."""
    gid, branch, named = (headers.get(h) for h in (GID_HEADER, BRANCH_HEADER, OP_HEADER))
    authorization = headers.get("authorization") or ""
    if gid is None or branch is None or named is None or not authorization.startswith("Bearer "):
        raise Unauthorized(
            f"a call needs {GID_HEADER}, {BRANCH_HEADER}, {OP_HEADER} and a Bearer proof"
        )
    for what, value in (("gid", gid), ("branch", branch)):
        if len(value) > MAX_ID_LENGTH or not ID_RE.fullmatch(value):
            raise BadRequest(f"{what} must be 1 to {MAX_ID_LENGTH} of A-Z a-z 0-9 . _ : -")
    if named != op.value:
        raise BadRequest(f"{OP_HEADER} is {named!r} on the {op.value} path")
    if not proof_matches(token, gid, branch, op, authorization.removeprefix("Bearer ").strip()):
        raise Unauthorized("wrong proof for this call")
    return gid, branch


def parse_call(op: Op, gid: str, branch: str, body: bytes) -> Call:
    """The call in ``body``, which must name the same ``gid``, ``branch`` and ``op`` as
    the authenticated headers (:class:`BadRequest` otherwise)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest("the body is not JSON", code=Code.INVALID_JSON) from exc
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object {gid, branch, op, payload}")
    named = (data.get("gid"), data.get("branch"), data.get("op"))
    if named != (gid, branch, op.value):
        raise BadRequest("the body's gid, branch and op must be the headers' and the path's")
    return Call(gid, branch, op, data.get("payload"))
