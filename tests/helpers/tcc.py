"""TCC rows and participants for the driver's tests: transactions written straight into
``rmsg_tcc_*`` (the driver's input), participants served over real HTTP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from reliable_msg.sdk import tcc
from reliable_msg.sdk.tcc import Call, Participant
from reliable_msg.tcc import BRANCH_HEADER, GID_HEADER, OP_HEADER, Op, proof_matches
from tests.helpers import tables
from tests.helpers.servers import serving_app

#: Each test participant's token.
TOKENS = {"inventory": "inventory-tcc-token", "credit": "credit-tcc-token"}


async def reset(db: asyncpg.Connection) -> None:
    """No TCC rows, an empty barrier and no business effects."""
    await tcc.install(db)
    await db.execute(
        """
        CREATE TABLE IF NOT EXISTS tcc_effects
            (participant text, gid text, branch text, op text);
        """
    )
    await tables.empty(db, "rmsg_tcc_transaction", "tcc_effects", tcc.BARRIER_TABLE)


async def insert(
    db: asyncpg.Connection,
    gid: str,
    status: str,
    branches: Sequence[tuple[str, str]],
    *,
    age: float = 0.0,
    deadline_in: float = 60.0,
) -> None:
    """A transaction begun ``age`` seconds ago (and moved to ``status`` then), its
    deadline ``deadline_in`` seconds from now, with ``(branch, participant)`` registered."""
    await db.execute(
        """
        INSERT INTO rmsg_tcc_transaction
            (gid, initiator, status, timeout, deadline, created_at, updated_at)
        VALUES ($1, 'order', $2, make_interval(secs => $3::float8 + $4::float8),
                now() + make_interval(secs => $4),
                now() - make_interval(secs => $3), now() - make_interval(secs => $3))
        """,
        gid,
        status,
        age,
        deadline_in,
    )
    await db.executemany(
        "INSERT INTO rmsg_tcc_branch (gid, branch, participant, payload, status)"
        " VALUES ($1, $2, $3, $4, 'registered')",
        [(gid, b, p, json.dumps({"qty": 1, "branch": b})) for b, p in branches],
    )


async def insert_many(
    db: asyncpg.Connection, gids: Sequence[str], status: str, participant: str
) -> None:
    """Many transactions at once, the i-th with 1 + i % 2 branches (``b0``, ``b1``)."""
    await db.execute(
        """
        INSERT INTO rmsg_tcc_transaction (gid, initiator, status, timeout, deadline)
        SELECT g, 'order', $2, interval '60 s', now() + interval '60 s' FROM unnest($1::text[]) g
        """,
        list(gids),
        status,
    )
    await db.execute(
        """
        INSERT INTO rmsg_tcc_branch (gid, branch, participant, payload, status)
        SELECT g, 'b' || k, $2, '{"qty": 1}', 'registered'
        FROM unnest($1::text[]) WITH ORDINALITY AS t(g, i), generate_series(0, (i % 2)::int) k
        """,
        list(gids),
        participant,
    )


async def events(db: asyncpg.Connection, gid: str | None = None) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT * FROM rmsg_tcc_event WHERE $1::text IS NULL OR gid = $1 ORDER BY id", gid
    )


async def transaction(db: asyncpg.Connection, gid: str) -> asyncpg.Record:
    row = await db.fetchrow("SELECT * FROM rmsg_tcc_transaction WHERE gid = $1", gid)
    assert row is not None
    return row


async def branch(db: asyncpg.Connection, gid: str, name: str) -> asyncpg.Record:
    row = await db.fetchrow(
        "SELECT * FROM rmsg_tcc_branch WHERE gid = $1 AND branch = $2", gid, name
    )
    assert row is not None
    return row


def participant(pool: asyncpg.Pool, name: str) -> Participant:
    """An SDK participant whose every handler records its effect in ``tcc_effects``."""
    p = Participant(pool, TOKENS[name], name=name)

    async def effect(conn: asyncpg.Connection, call: Call) -> None:
        await conn.execute(
            "INSERT INTO tcc_effects VALUES ($1, $2, $3, $4)",
            name,
            call.gid,
            call.branch,
            call.op.value,
        )

    p.on_try(effect)
    p.on_confirm(effect)
    p.on_cancel(effect)
    return p


def sdk_app(*participants: Participant) -> FastAPI:
    """``participants`` under ``/<name>``."""
    app = FastAPI()
    for p in participants:
        app.include_router(p.router(f"/{p.name}"))
    return app


@dataclass
class Scripted:
    """A participant that misbehaves on purpose: it answers the statuses in ``answers``
    in turn (200 once they run out; a failure saying ``error``), or holds every call
    while ``hold`` is set. Each call it took is kept in ``calls`` as ``(gid, branch,
    op)``, checked for its proof."""

    name: str
    answers: list[int] = field(default_factory=list)
    #: said in each failed answer's body (which the driver keeps as the branch's error)
    error: str = ""
    hold: bool = False
    calls: list[tuple[str, str, str]] = field(default_factory=list)
    holding: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> FastAPI:
        app = FastAPI()
        for op in (Op.CONFIRM, Op.CANCEL):
            app.add_api_route(f"/{self.name}/{op.value}", self._endpoint(op), methods=["POST"])
        return app

    def _endpoint(self, op: Op) -> Any:
        async def endpoint(request: Request) -> Response:
            return await self.answer(op, request)

        endpoint.__name__ = f"scripted_{op.value}"
        return endpoint

    async def answer(self, op: Op, request: Request) -> Response:
        gid, branch = request.headers[GID_HEADER], request.headers[BRANCH_HEADER]
        given = request.headers.get("Authorization", "").removeprefix("Bearer ")
        body = await request.json()
        authentic = proof_matches(TOKENS[self.name], gid, branch, op, given)
        if not authentic or request.headers[OP_HEADER] != op.value or body["gid"] != gid:
            return JSONResponse({"error": {"code": "unauthorized"}}, status_code=401)
        self.calls.append((gid, branch, op.value))
        if self.hold:
            self.holding.set()
            await self.released.wait()
        status = self.answers.pop(0) if self.answers else 200
        said = {"error": self.error} if self.error and status != 200 else {}
        return JSONResponse({"status": status, **said}, status_code=status)


@asynccontextmanager
async def serving(app: FastAPI, port: int | None = None) -> AsyncIterator[str]:
    async with serving_app(app, port) as url:
        yield url
