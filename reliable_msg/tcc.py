"""The wire contract of TCC between the coordinator, the initiator and the participants
(shared by the service and the SDKs).

Every call of a branch's Try, Confirm or Cancel is a ``POST`` of JSON
``{"gid": ..., "branch": ..., "op": ..., "payload": ...}`` to the participant's
``<url>/try``, ``<url>/confirm`` or ``<url>/cancel``, with :data:`GID_HEADER`,
:data:`BRANCH_HEADER` and :data:`OP_HEADER` naming the call and ``Authorization: Bearer
<proof>``. The proof is :func:`proof`: an HMAC keyed by the participant's token, so that
the token itself never travels and a proof opens only the one call it was made for. The
coordinator makes the proofs of Confirm and Cancel itself and hands the initiator the
proof of each Try when it registers the branches.

A participant answers 200 for done (also for a call it had done already), 409 on a Try
for a business refusal (the initiator cancels the transaction), anything else for a
failure the coordinator retries (Confirm, Cancel) or the initiator takes as a failed Try.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from enum import StrEnum
from typing import Any

#: The global transaction a call belongs to.
GID_HEADER = "X-Rmsg-Gid"
#: The branch of that transaction.
BRANCH_HEADER = "X-Rmsg-Branch"
#: The operation: one of :class:`Op`.
OP_HEADER = "X-Rmsg-Op"


class Op(StrEnum):
    TRY = "try"  #: reserve: freeze stock, prepare points, create an order in UNKNOWN
    CONFIRM = "confirm"  #: make the reservation final
    CANCEL = "cancel"  #: give the reservation back (or record that there was none)


def proof(token: str, gid: str, branch: str, op: Op) -> str:
    """The bearer proof of one call: HMAC-SHA256 of ``gid``, ``branch`` and ``op`` keyed
    by the participant's ``token``, in hex."""
    message = "\n".join((gid, branch, op.value)).encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def proof_matches(token: str, gid: str, branch: str, op: Op, given: str) -> bool:
    """Whether ``given`` is the proof of this call (compared in constant time)."""
    return hmac.compare_digest(proof(token, gid, branch, op), given)


def call_body(gid: str, branch: str, op: Op, payload: Any) -> bytes:
    """The body of a call: compact UTF-8 JSON, as ``tcc.max_payload_bytes`` measures the
    payload. The default (``\\uXXXX`` escapes, spaces) could make a payload within that
    limit twice as long, over a participant's body bound (the SDK's ``MAX_BODY``), and
    refused every time."""
    body = {"gid": gid, "branch": branch, "op": op.value, "payload": payload}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def unproved(text: str, bearer: str) -> str:
    """``text`` without the call's proof ``bearer``: an error about a call (an answer may
    echo the proof, an HTTP library's error may hold the request's headers) is logged and
    shown, and the proof opens that call for anyone who reads it."""
    return text.replace(bearer, "<proof>")
