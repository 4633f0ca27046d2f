"""The participant's checks of a call's headers and body, without I/O."""

from __future__ import annotations

import pytest

from reliable_msg.errors import BadRequest, Code, Unauthorized
from reliable_msg.sdk.tcc import Call, Op
from reliable_msg.sdk.tcc.call import MAX_ID_LENGTH, authenticate, parse_call
from reliable_msg.tcc import BRANCH_HEADER, GID_HEADER, OP_HEADER, proof

TOKEN = "t0ken"


def headers(gid: str = "g1", branch: str = "b1", op: Op = Op.TRY, **over: str) -> dict[str, str]:
    sent = {
        GID_HEADER: gid,
        BRANCH_HEADER: branch,
        OP_HEADER: op.value,
        "authorization": f"Bearer {proof(TOKEN, gid, branch, op)}",
    }
    return {**sent, **over}


def test_a_proven_call_names_its_gid_and_branch() -> None:
    assert authenticate(TOKEN, Op.TRY, headers()) == ("g1", "b1")
    assert authenticate(TOKEN, Op.CANCEL, headers("a:b.c-d_e", "x" * MAX_ID_LENGTH, Op.CANCEL))


@pytest.mark.parametrize("missing", [GID_HEADER, BRANCH_HEADER, OP_HEADER, "authorization"])
def test_a_call_without_a_header_is_unauthorized(missing: str) -> None:
    sent = headers()
    del sent[missing]
    with pytest.raises(Unauthorized):
        authenticate(TOKEN, Op.TRY, sent)


@pytest.mark.parametrize(
    "sent",
    [
        headers(authorization="Basic abc"),
        headers(authorization=f"Bearer {proof('other', 'g1', 'b1', Op.TRY)}"),
        headers(authorization=f"Bearer {proof(TOKEN, 'g2', 'b1', Op.TRY)}"),
        headers(authorization=f"Bearer {proof(TOKEN, 'g1', 'b2', Op.TRY)}"),
        headers(authorization=f"Bearer {proof(TOKEN, 'g1', 'b1', Op.CANCEL)}"),
    ],
)
def test_a_wrong_proof_is_unauthorized(sent: dict[str, str]) -> None:
    with pytest.raises(Unauthorized):
        authenticate(TOKEN, Op.TRY, sent)


@pytest.mark.parametrize(
    "sent",
    [
        headers(gid=""),
        headers(gid="g/1"),
        headers(branch="b 1"),
        headers(gid="g" * (MAX_ID_LENGTH + 1)),
        headers(gid="g1\n"),  # ``$`` alone takes a trailing newline
        headers(branch="b1\n"),
        headers(op=Op.CONFIRM),  # a proven Confirm sent to the Try path
    ],
)
def test_malformed_ids_or_another_op_are_bad_requests(sent: dict[str, str]) -> None:
    with pytest.raises(BadRequest):
        authenticate(TOKEN, Op.TRY, sent)


def test_a_body_naming_the_call_gives_it() -> None:
    body = b'{"gid": "g1", "branch": "b1", "op": "confirm", "payload": {"qty": 2}}'
    assert parse_call(Op.CONFIRM, "g1", "b1", body) == Call("g1", "b1", Op.CONFIRM, {"qty": 2})
    bare = b'{"gid": "g1", "branch": "b1", "op": "confirm"}'
    assert parse_call(Op.CONFIRM, "g1", "b1", bare).payload is None


@pytest.mark.parametrize(
    "body",
    [
        b'{"gid": "g2", "branch": "b1", "op": "confirm"}',
        b'{"gid": "g1", "branch": "b2", "op": "confirm"}',
        b'{"gid": "g1", "branch": "b1", "op": "try"}',
        b'{"branch": "b1", "op": "confirm"}',
        b"[]",
        b"null",
    ],
)
def test_a_body_naming_another_call_is_a_bad_request(body: bytes) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_call(Op.CONFIRM, "g1", "b1", body)
    assert caught.value.code == Code.BAD_REQUEST


@pytest.mark.parametrize("body", [b"", b"{", b"\xff\xfe", b"{'gid': 1}"])
def test_a_body_that_is_not_json_is_invalid_json(body: bytes) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_call(Op.CONFIRM, "g1", "b1", body)
    assert caught.value.code == Code.INVALID_JSON
