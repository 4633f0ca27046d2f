"""TCC participants for the tests that run the coordinator as real ``reliable-msg serve``
processes: the harness's (:mod:`reliable_msg.harness.tcc_party`), each one a real uvicorn
server built with the participant SDK, with a schema of its own in the test database
(its account, its log of handler runs and its barrier), and every answer it gave
recorded, so that a test can tell a Confirm that ran from one the barrier answered as a
duplicate; and the initiator's Trys, called as the initiator calls them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from reliable_msg.harness.tcc_party import START, Answer, Party, serving_party
from reliable_msg.sdk.tcc import Op
from reliable_msg.tcc import BRANCH_HEADER, GID_HEADER, OP_HEADER

__all__ = ["START", "Answer", "Party", "call_try", "run_try", "run_trys", "serving_party"]


async def call_try(
    http: httpx.AsyncClient, gid: str, branch: dict[str, Any], payload: Any
) -> httpx.Response:
    """The initiator's Try of one registered ``branch`` (an item of the register
    answer: its try URL and proof)."""
    return await http.post(
        branch["try_url"],
        json={"gid": gid, "branch": branch["branch"], "op": Op.TRY.value, "payload": payload},
        headers={
            GID_HEADER: gid,
            BRANCH_HEADER: branch["branch"],
            OP_HEADER: Op.TRY.value,
            "Authorization": f"Bearer {branch['proof']}",
        },
    )


async def run_try(http: httpx.AsyncClient, gid: str, branch: dict[str, Any], payload: Any) -> None:
    """:func:`call_try`, which must succeed."""
    answer = await call_try(http, gid, branch, payload)
    assert answer.status_code == 200, answer.text


async def run_trys(gid: str, branches: list[dict[str, Any]], payload: Any) -> None:
    """Every registered branch's Try, concurrently, as the initiator runs them."""
    async with httpx.AsyncClient(timeout=10) as http:
        await asyncio.gather(*(run_try(http, gid, b, payload) for b in branches))
