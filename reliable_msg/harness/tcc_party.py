"""A TCC participant for the tools and the tests: a real HTTP server built with the
participant SDK, over a schema of its own (``tcc_<name>``) in the database it is given,
holding its business row, its log of handler runs and its barrier.

The business is the seed's inventory, credit and wms in one shape: an account starting
at ``start`` (:data:`START` by default) whose Try freezes ``qty`` (refused when not
enough is available, or when ``qty`` is no whole number from 1 to :data:`MAX_QTY`),
whose Confirm takes the frozen ``qty`` and whose Cancel gives it back, so that
``available + frozen + taken`` is conserved. Every handler run is logged
(gid, branch, op) in the same transaction as its effect: :func:`tally` counts them per
gid, so a checker sees an effect applied twice, or a transaction half confirmed.

As a process (the demo, the soak, the bench)::

    python -m reliable_msg.harness.tcc_party --name inventory --port 8101 \\
        --database-url postgresql://127.0.0.1/shop  # token in RMSG_PARTY_TOKEN

serves ``POST /tcc/<name>/try``, ``/confirm``, ``/cancel`` and ``GET /readyz``, its
schema created at start if missing (its account, runs and barrier kept as they are).
In a test's event loop: :func:`serving_party`, over a schema made afresh and dropped
afterwards, every answer it gave recorded.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import click
from fastapi import FastAPI, Response

from reliable_msg.errors import ConfigError
from reliable_msg.sdk import tcc
from reliable_msg.sdk.tcc import Call, Op, Participant, Refused

from .asgi import serving_app

#: Each participant's account at the start, unless told otherwise.
START = 100
#: A participant's name: it names its schema and its URL path.
NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,39}")
#: The most a call may move (the account's columns are ``int``).
MAX_QTY = 2**31 - 1
#: Connections of a served participant's pool.
POOL_SIZE = 8
#: Serialises the creation of the schemas of parties starting at once (any constant
#: key of the database's advisory locks will do).
INSTALL_LOCK = 0x7CC_9A27


def schema(name: str) -> str:
    """The schema of participant ``name``; :class:`ConfigError` for a name that cannot
    be one."""
    if not NAME_RE.fullmatch(name):
        raise ConfigError(f"participant name {name!r}: lowercase letters, digits and _ only")
    return f"tcc_{name}"


async def install(conn: asyncpg.Connection, name: str, start: int = START) -> None:
    """Create ``name``'s schema, account (at ``start``), runs and barrier unless they
    exist (whatever they hold is kept)."""
    s = schema(name)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", INSTALL_LOCK)
        await conn.execute(
            f"""
            CREATE SCHEMA IF NOT EXISTS {s};
            CREATE TABLE IF NOT EXISTS {s}.account (available int, frozen int, taken int);
            CREATE TABLE IF NOT EXISTS {s}.runs (gid text, branch text, op text);
            """
        )
        await conn.execute(
            f"INSERT INTO {s}.account SELECT $1, 0, 0 WHERE NOT EXISTS (SELECT FROM {s}.account)",
            start,
        )
        await conn.execute(f"SET LOCAL search_path = {s}")
        await tcc.install(conn)


async def drop(conn: asyncpg.Connection, name: str) -> None:
    """Drop ``name``'s schema and all it holds, if there."""
    await conn.execute(f"DROP SCHEMA IF EXISTS {schema(name)} CASCADE")


# -- the participant: its handlers, and its app -------------------------------------------


def _qty(call: Call) -> int:
    """The call's ``qty``: a whole number from 1 to the account's int range, else
    :class:`Refused` (a Try's 409; a bool, which Python counts as an int, is none)."""
    qty = call.payload.get("qty") if isinstance(call.payload, dict) else None
    if type(qty) is not int or not 0 < qty <= MAX_QTY:
        raise Refused(f"qty must be a whole number from 1 to {MAX_QTY}, not {qty!r}"[:200])
    return qty


async def _effect(conn: asyncpg.Connection, call: Call, update: str) -> None:
    # the run logged and the account moved in one statement: one round trip, not two
    done = await conn.execute(
        f"WITH run AS (INSERT INTO runs (gid, branch, op) VALUES ($2, $3, $4)) {update}",
        _qty(call),
        call.gid,
        call.branch,
        call.op.value,
    )
    if done == "UPDATE 0":
        raise Refused("not enough")


def handle(p: Participant) -> Participant:
    """Register the account's Try, Confirm and Cancel on ``p`` (whose pool's
    connections must have the party's schema as their ``search_path``)."""

    @p.on_try
    async def freeze(conn: asyncpg.Connection, call: Call) -> None:
        await _effect(
            conn,
            call,
            "UPDATE account SET available = available - $1, frozen = frozen + $1"
            " WHERE available >= $1",
        )

    @p.on_confirm
    async def take(conn: asyncpg.Connection, call: Call) -> None:
        await _effect(conn, call, "UPDATE account SET frozen = frozen - $1, taken = taken + $1")

    @p.on_cancel
    async def give_back(conn: asyncpg.Connection, call: Call) -> None:
        await _effect(
            conn, call, "UPDATE account SET frozen = frozen - $1, available = available + $1"
        )

    return p


def path(name: str) -> str:
    """The URL path of ``name``'s endpoints (``<base URL><path>/try``)."""
    return f"/tcc/{name}"


def app(participant: Participant) -> FastAPI:
    """The participant's endpoints under :func:`path`, and ``GET /readyz``."""
    served = FastAPI()
    served.include_router(participant.router(path(participant.name)))

    @served.get("/readyz")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    return served


async def pool(database_url: str, name: str, size: int = POOL_SIZE) -> asyncpg.Pool:
    """A pool whose connections work in ``name``'s schema."""
    return await asyncpg.create_pool(
        database_url,
        min_size=1,
        max_size=size,
        server_settings={"search_path": schema(name)},
        reset=_keep_session,
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to reset when a connection goes back to the pool: the handlers change no
    session state (the service's pool does the same), and asyncpg's default reset is a
    round trip of four statements after every call."""


# -- the tally: how often each handler ran ------------------------------------------------


@dataclass(frozen=True, order=True)
class Run:
    """One handler of one branch at one participant."""

    participant: str
    gid: str
    branch: str
    op: str


class Tally(Counter[Run]):
    """How many times each handler ran, per participant, gid, branch and op."""

    def twice(self) -> list[tuple[Run, int]]:
        """The handlers that ran more than once: an effect applied twice."""
        return sorted((run, n) for run, n in self.items() if n > 1)

    def gids(self) -> set[str]:
        return {run.gid for run in self}

    def ops(self, gid: str) -> dict[tuple[str, str], dict[str, int]]:
        """``gid``'s runs: (participant, branch) → op → times it ran."""
        out: dict[tuple[str, str], dict[str, int]] = {}
        for run, n in self.items():
            if run.gid == gid:
                out.setdefault((run.participant, run.branch), {})[run.op] = n
        return out


#: The runs of one participant, counted (``{schema}`` to be filled in).
TALLY_SQL = "SELECT gid, branch, op, count(*) AS n FROM {schema}.runs GROUP BY gid, branch, op"


async def tally(conn: asyncpg.Connection, names: Iterable[str]) -> Tally:
    """The runs of the participants ``names`` in ``conn``'s database."""
    counted = Tally()
    for name in names:
        for r in await conn.fetch(TALLY_SQL.format(schema=schema(name))):
            counted[Run(name, r["gid"], r["branch"], r["op"])] = r["n"]
    return counted


async def account(conn: asyncpg.Connection, name: str) -> tuple[int, int, int]:
    """``name``'s account: (available, frozen, taken)."""
    row = await conn.fetchrow(f"SELECT available, frozen, taken FROM {schema(name)}.account")
    assert row is not None, f"{name} has no account"
    return row["available"], row["frozen"], row["taken"]


# -- served in a test's event loop ----------------------------------------------------------


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
    """A served participant: its name, token, port, the URL of its endpoints (the
    ``url`` of its ``[participants.<name>]``), its database, and the participant with
    every answer it gave."""

    name: str
    token: str
    port: int
    url: str
    database_url: str
    participant: RecordingParticipant

    @property
    def schema(self) -> str:
        return schema(self.name)

    @property
    def answers(self) -> list[Answer]:
        return self.participant.answers

    def outcomes(self, op: Op, gid: str) -> list[str]:
        """The outcomes of the ``op`` calls of ``gid`` answered 200, in order."""
        return [a.outcome for a in self.answers if a.op is op and a.gid == gid and a.status == 200]

    async def account(self) -> tuple[int, int, int]:
        """(available, frozen, taken)."""
        conn = await asyncpg.connect(self.database_url)
        try:
            return await account(conn, self.name)
        finally:
            await conn.close()

    async def runs(self, gid: str) -> list[tuple[str, str]]:
        """The handler runs of ``gid``: (branch, op), sorted, one per run."""
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


@asynccontextmanager
async def serving_party(
    database_url: str, name: str, *, start: int = START, size: int = 4
) -> AsyncIterator[Party]:
    """The participant ``name`` served on a free port in this event loop, over its
    schema made afresh (its account at ``start``, no runs, no barrier) and dropped
    afterwards."""
    conn = await asyncpg.connect(database_url)
    try:
        await drop(conn, name)
        await install(conn, name, start)
    finally:
        await conn.close()
    connections = await pool(database_url, name, size)
    try:
        token = f"{name}-participant-token"
        participant = RecordingParticipant(connections, token, name=name)
        async with serving_app(app(handle(participant))) as url:
            port = int(url.rsplit(":", 1)[1])
            yield Party(name, token, port, url + path(name), database_url, participant)
    finally:
        await connections.close()
        conn = await asyncpg.connect(database_url)
        try:
            await drop(conn, name)
        finally:
            await conn.close()


# -- served as a process --------------------------------------------------------------------


def argv(
    name: str, port: int, database_url: str, *, start: int = START, pool_size: int = POOL_SIZE
) -> list[str]:
    """The command line of a party process (its token goes in ``RMSG_PARTY_TOKEN``)."""
    return [
        sys.executable,
        "-m",
        "reliable_msg.harness.tcc_party",
        "--name",
        name,
        "--port",
        str(port),
        "--database-url",
        database_url,
        "--start",
        str(start),
        "--pool-size",
        str(pool_size),
    ]


async def serve(
    name: str, port: int, database_url: str, token: str, *, start: int, size: int
) -> None:
    """Install ``name``'s schema and serve it on 127.0.0.1:``port`` until SIGTERM."""
    import uvicorn

    conn = await asyncpg.connect(database_url)
    try:
        await install(conn, name, start)
    finally:
        await conn.close()
    connections = await pool(database_url, name, size)
    try:
        participant = handle(Participant(connections, token, name=name))
        config = uvicorn.Config(
            app(participant),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
        await uvicorn.Server(config).serve()
    finally:
        await connections.close()


@click.command()
@click.option("--name", envvar="RMSG_PARTY_NAME", required=True, help="Participant name.")
@click.option("--port", envvar="RMSG_PARTY_PORT", type=int, required=True)
@click.option("--database-url", envvar="RMSG_PARTY_DATABASE_URL", required=True)
@click.option(
    "--token", envvar="RMSG_PARTY_TOKEN", required=True, help="Its [participants.<name>] token."
)
@click.option("--start", envvar="RMSG_PARTY_START", type=int, default=START, show_default=True)
@click.option("--pool-size", type=int, default=POOL_SIZE, show_default=True)
def main(name: str, port: int, database_url: str, token: str, start: int, pool_size: int) -> None:
    """Serve the TCC participant NAME (see the module's docstring)."""
    import uvloop

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    try:
        schema(name)
    except ConfigError as exc:
        raise click.BadParameter(exc.message, param_hint="--name") from exc
    uvloop.run(serve(name, port, database_url, token, start=start, size=pool_size))


if __name__ == "__main__":
    main()
