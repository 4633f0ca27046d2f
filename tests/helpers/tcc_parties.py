"""TCC participants for the tests that run the coordinator as real ``reliable-msg serve``
processes: each one a real uvicorn server built with the participant SDK, with a schema
of its own in the test database (its business table, its log of handler runs and its
barrier), and every answer it gave recorded, so that a test can tell a Confirm that ran
from one the barrier answered as a duplicate.

The business is the seed's inventory, credit and wms in one shape: an account starting
at :data:`START` whose Try freezes ``qty``, whose Confirm takes the frozen ``qty`` and
whose Cancel gives it back.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
from fastapi import FastAPI, Response

from reliable_msg.harness.ports import free_port
from reliable_msg.sdk import tcc
from reliable_msg.sdk.tcc import Call, Op, Participant, Refused
from reliable_msg.tcc import BRANCH_HEADER, GID_HEADER, OP_HEADER
from tests.helpers.servers import serving_app

#: Each participant's account at the start.
START = 100


@dataclass(frozen=True)
class Answer:
    """One call a participant answered: its op and branch, the HTTP status, and the
    outcome (``done``, ``duplicate``, ``empty_rollback``) or the error's code."""

    op: Op
    gid: str
    branch: str
    status: int
    outcome: str


class RecordingParticipant(Participant):
    """A :class:`Participant` that keeps every answer it gave, in order."""

    def __init__(self, pool: asyncpg.Pool, token: str, *, name: str) -> None:
        super().__init__(pool, token, name=name)
        self.answers: list[Answer] = []

    async def run(self, call: Call) -> Response:
        response = await super().run(call)
        body = json.loads(bytes(response.body))
        outcome = body["outcome"] if response.status_code == 200 else body["error"]["code"]
        self.answers.append(Answer(call.op, call.gid, call.branch, response.status_code, outcome))
        return response


@dataclass
class Party:
    """A served participant: its name (its schema is ``tcc_<name>``), token, direct
    base URL and port."""

    name: str
    token: str
    port: int
    url: str
    database_url: str
    participant: RecordingParticipant

    @property
    def schema(self) -> str:
        return f"tcc_{self.name}"

    @property
    def answers(self) -> list[Answer]:
        return self.participant.answers

    def outcomes(self, op: Op, gid: str) -> list[str]:
        """The outcomes of the ``op`` calls of ``gid`` answered 200, in order."""
        return [a.outcome for a in self.answers if a.op is op and a.gid == gid and a.status == 200]

    async def account(self) -> tuple[int, int, int]:
        """(available, frozen, taken)."""
        row = await self._fetch("SELECT available, frozen, taken FROM {s}.account")
        return row[0]["available"], row[0]["frozen"], row[0]["taken"]

    async def runs(self, gid: str) -> list[tuple[str, str]]:
        """The handler runs of ``gid``: (branch, op), sorted."""
        rows = await self._fetch("SELECT branch, op FROM {s}.runs WHERE gid = $1", gid)
        return sorted((r["branch"], r["op"]) for r in rows)

    async def barrier(self, gid: str) -> list[tuple[str, str, str]]:
        """The barrier rows of ``gid``: (branch, op, origin), sorted."""
        sql = f"SELECT branch, op, origin FROM {{s}}.{tcc.BARRIER_TABLE} WHERE gid = $1"
        rows = await self._fetch(sql, gid)
        return sorted((r["branch"], r["op"], r["origin"]) for r in rows)

    async def has_barrier(self, gid: str, branch: str, op: Op) -> bool:
        return (branch, op.value, op.value) in await self.barrier(gid)

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        # A connection of its own each time, not the participant's pool: the checks must
        # work while a test terminates the database's backends under that pool.
        conn = await asyncpg.connect(self.database_url)
        try:
            return await conn.fetch(sql.format(s=self.schema), *args)
        finally:
            await conn.close()

    def config(self, url: str | None = None) -> dict[str, Any]:
        """Its ``[participants.<name>]`` table, called at ``url`` (a fault proxy's,
        say) or directly."""
        return {"url": url or self.url, "token": self.token}


async def _handler_effect(conn: asyncpg.Connection, call: Call, sql: str) -> None:
    await conn.execute(
        "INSERT INTO runs (gid, branch, op) VALUES ($1, $2, $3)",
        call.gid,
        call.branch,
        call.op.value,
    )
    if await conn.execute(sql, call.payload["qty"]) == "UPDATE 0":
        raise Refused("not enough")


def _participant(pool: asyncpg.Pool, name: str, token: str) -> RecordingParticipant:
    p = RecordingParticipant(pool, token, name=name)

    @p.on_try
    async def freeze(conn: asyncpg.Connection, call: Call) -> None:
        await _handler_effect(
            conn,
            call,
            "UPDATE account SET available = available - $1, frozen = frozen + $1"
            " WHERE available >= $1",
        )

    @p.on_confirm
    async def take(conn: asyncpg.Connection, call: Call) -> None:
        await _handler_effect(
            conn, call, "UPDATE account SET frozen = frozen - $1, taken = taken + $1"
        )

    @p.on_cancel
    async def give_back(conn: asyncpg.Connection, call: Call) -> None:
        await _handler_effect(
            conn, call, "UPDATE account SET frozen = frozen - $1, available = available + $1"
        )

    return p


@asynccontextmanager
async def serving_party(database_url: str, name: str) -> AsyncIterator[Party]:
    """The participant ``name`` served on a free port, over a schema ``tcc_<name>`` of
    the test database made afresh (its account at :data:`START`, no runs, no barrier)
    and dropped afterwards."""
    schema = f"tcc_{name}"
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            f"""
            DROP SCHEMA IF EXISTS {schema} CASCADE;
            CREATE SCHEMA {schema};
            SET search_path = {schema};
            CREATE TABLE account (available int, frozen int, taken int);
            CREATE TABLE runs (gid text, branch text, op text);
            INSERT INTO account VALUES ({START}, 0, 0);
            """
        )
        await tcc.install(conn)
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(
        database_url, min_size=1, max_size=4, server_settings={"search_path": schema}
    )
    try:
        token = f"{name}-participant-token"
        participant = _participant(pool, name, token)
        app = FastAPI()
        prefix = f"/tcc/{name}"
        app.include_router(participant.router(prefix))
        port = free_port()
        async with serving_app(app, port) as url:
            yield Party(name, token, port, url + prefix, database_url, participant)
    finally:
        await pool.close()
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        finally:
            await conn.close()


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
