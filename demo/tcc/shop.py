"""The TCC shop's participants, each a real HTTP server over its own schema
(:mod:`demo.tcc.books`), built with the participant SDK; the order service is also the
initiator.

``POST /tcc/<name>/try|confirm|cancel``
    the participant's calls (the SDK's router, behind its barrier).
``POST /orders/{id}/pay?crash=before_commit`` (the order service only)
    pays the order by TCC: begins a global transaction, registers and tries the four
    branches, commits. 200 ``{"gid", "status"}`` once committed (the coordinator then
    confirms every branch); 409 ``refused`` when a Try refused (out of stock: cancelled);
    502 ``try_failed`` when a Try failed or got no answer (cancelled); 503 when the
    coordinator did not answer. ``crash=before_commit`` kills the order service by
    SIGKILL after its Trys, before its commit: the deadline cancels the transaction.
``GET /health``
    200 when the database answers.

The demo's other injected faults come through the environment, as order ids
(:class:`Faults`): a participant that dies once in a Confirm, one whose Confirm is slow
(held until the demo has killed the coordinator that called), one that holds a Try back
until its Cancel has come: each waits on the condition, not on a guess of the timing.
Each happens once per order; a marker file in the state directory records it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reliable_msg.errors import ReliableMsgError, TryFailed, TryRefused
from reliable_msg.sdk.tcc import BARRIER_TABLE, Branch, Call, Initiator, Participant, Refused
from reliable_msg.tcc import BRANCH_HEADER, GID_HEADER, Op

from ..errors import DemoError
from ..processes import until

log = logging.getLogger(__name__)

PARTICIPANTS = ("order", "inventory", "credit", "wms")
#: Each participant's branch of paying order ``i`` is ``<prefix>-<i>``.
BRANCH_PREFIX = {"order": "order", "inventory": "stock", "credit": "points", "wms": "delivery"}


def gid(order_id: int) -> str:
    """The global transaction that pays ``order_id``."""
    return f"pay-order-{order_id}"


def marker(participant: str, fault: str, order_id: int) -> str:
    """The state file that records ``fault`` of ``participant`` for ``order_id``."""
    return f"tcc-{participant}-{fault}-{order_id}"


def branches(order: asyncpg.Record) -> list[Branch]:
    """The four branches of paying ``order`` (a row of ``tcc_order.orders``)."""
    i = order["id"]
    goods = {"order_id": i, "sku": order["sku"], "qty": order["qty"]}
    return [
        Branch("order", f"order-{i}", {"order_id": i}),
        Branch("inventory", f"stock-{i}", goods),
        Branch(
            "credit", f"points-{i}", {"member_id": order["member_id"], "points": order["points"]}
        ),
        Branch("wms", f"delivery-{i}", goods),
    ]


#: participant -> op -> (SQL, its arguments from the call, what an UPDATE 0 means):
#: a Try's refusal, or (Confirm, Cancel) a book that is not as its Try left it.
Step = tuple[str, Callable[[Call], tuple[Any, ...]], str]
STEPS: dict[str, dict[Op, Step]] = {
    "order": {
        Op.TRY: (
            "UPDATE orders SET status = 'UPDATING' WHERE id = $1 AND status = 'CREATED'",
            lambda c: (c.payload["order_id"],),
            "the order is not payable",
        ),
        Op.CONFIRM: (
            "UPDATE orders SET status = 'PAYED' WHERE id = $1 AND status = 'UPDATING'",
            lambda c: (c.payload["order_id"],),
            "the order is not UPDATING",
        ),
        Op.CANCEL: (
            "UPDATE orders SET status = 'CANCELED' WHERE id = $1 AND status = 'UPDATING'",
            lambda c: (c.payload["order_id"],),
            "the order is not UPDATING",
        ),
    },
    "inventory": {
        Op.TRY: (
            "UPDATE products SET available = available - $2, frozen = frozen + $2"
            " WHERE sku = $1 AND available >= $2",
            lambda c: (c.payload["sku"], c.payload["qty"]),
            "out of stock",
        ),
        Op.CONFIRM: (
            "UPDATE products SET frozen = frozen - $2, sold = sold + $2"
            " WHERE sku = $1 AND frozen >= $2",
            lambda c: (c.payload["sku"], c.payload["qty"]),
            "no frozen stock to sell",
        ),
        Op.CANCEL: (
            "UPDATE products SET frozen = frozen - $2, available = available + $2"
            " WHERE sku = $1 AND frozen >= $2",
            lambda c: (c.payload["sku"], c.payload["qty"]),
            "no frozen stock to give back",
        ),
    },
    "credit": {
        Op.TRY: (
            "UPDATE members SET prepare_add_credit = prepare_add_credit + $2 WHERE id = $1",
            lambda c: (c.payload["member_id"], c.payload["points"]),
            "no such member",
        ),
        Op.CONFIRM: (
            "UPDATE members SET prepare_add_credit = prepare_add_credit - $2,"
            " points = points + $2 WHERE id = $1 AND prepare_add_credit >= $2",
            lambda c: (c.payload["member_id"], c.payload["points"]),
            "no prepared points to add",
        ),
        Op.CANCEL: (
            "UPDATE members SET prepare_add_credit = prepare_add_credit - $2"
            " WHERE id = $1 AND prepare_add_credit >= $2",
            lambda c: (c.payload["member_id"], c.payload["points"]),
            "no prepared points to clear",
        ),
    },
    "wms": {
        Op.TRY: (
            "INSERT INTO sale_delivery_orders VALUES ($1, $2, $3, $4, 'UNKNOWN')",
            lambda c: (c.gid, c.payload["order_id"], c.payload["sku"], c.payload["qty"]),
            "",
        ),
        Op.CONFIRM: (
            "UPDATE sale_delivery_orders SET status = 'CREATED'"
            " WHERE gid = $1 AND status = 'UNKNOWN'",
            lambda c: (c.gid,),
            "no UNKNOWN sale delivery order",
        ),
        Op.CANCEL: (
            "UPDATE sale_delivery_orders SET status = 'CANCELED'"
            " WHERE gid = $1 AND status = 'UNKNOWN'",
            lambda c: (c.gid,),
            "no UNKNOWN sale delivery order",
        ),
    },
}


async def apply(conn: asyncpg.Connection, participant: str, call: Call) -> None:
    """Run ``participant``'s step for ``call`` on ``conn`` (its schema first in the
    search path): :class:`Refused` when a Try finds nothing to reserve; RuntimeError when
    a Confirm or Cancel finds the book otherwise than its Try left it (retried: a bug
    shows as a stalled transaction, never as a silent loss)."""
    sql, args, otherwise = STEPS[participant][call.op]
    if await conn.execute(sql, *args(call)) == "UPDATE 0":
        if call.op is Op.TRY:
            raise Refused(f"{participant}: {otherwise}")
        raise RuntimeError(f"{participant}: {otherwise} ({call.gid}/{call.branch})")


def order_of(branch: str) -> int | None:
    """The order id a branch id ends with."""
    _, _, tail = branch.rpartition("-")
    return int(tail) if tail.isdigit() else None


@dataclass(frozen=True, slots=True)
class Faults:
    """The injected faults of one participant, from ``DEMO_TCC_*``."""

    crash_in_confirm: frozenset[int]  #: die by SIGKILL in the Confirm of these orders
    #: hold the Confirm of these until the ``release`` marker is written (the demo writes
    #: it once it has killed the coordinator that called), at most ``delay`` seconds
    slow_confirm: frozenset[int]
    #: hold the Try of these back until its Cancel has come, at most ``delay`` seconds
    late_try: frozenset[int]
    delay: float
    state_dir: Path

    @classmethod
    def from_env(cls) -> Faults:
        def ids(name: str) -> frozenset[int]:
            return frozenset(int(i) for i in os.environ.get(name, "").split(",") if i)

        return cls(
            crash_in_confirm=ids("DEMO_TCC_CRASH_IN_CONFIRM"),
            slow_confirm=ids("DEMO_TCC_SLOW_CONFIRM"),
            late_try=ids("DEMO_TCC_LATE_TRY"),
            delay=float(os.environ.get("DEMO_TCC_DELAY", "20")),
            state_dir=Path(os.environ.get("DEMO_STATE_DIR", ".")),
        )

    def first(self, participant: str, fault: str, order_id: int, note: str = "") -> bool:
        """Record ``fault`` for ``order_id``; False if it was recorded before."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            with (self.state_dir / marker(participant, fault, order_id)).open("x") as f:
                f.write(note)
        except FileExistsError:
            return False
        return True


async def hold(condition: Callable[[], Awaitable[bool]], bound: float) -> None:
    """Wait until ``condition()`` is true, at most ``bound`` seconds: a fault waits on
    what it needs, not on a guess of how long that takes."""
    with contextlib.suppress(DemoError):
        await until(condition, bound, "", every=0.05)


def participant(name: str, pool: asyncpg.Pool, token: str, faults: Faults) -> Participant:
    """The participant ``name`` with its steps and its injected faults."""
    p = Participant(pool, token, name=name)

    async def on_try(conn: asyncpg.Connection, call: Call) -> None:
        await apply(conn, name, call)

    async def on_confirm(conn: asyncpg.Connection, call: Call) -> None:
        order_id = order_of(call.branch)
        if order_id in faults.crash_in_confirm and faults.first(name, "crash", order_id):
            log.warning("injected crash: %s dies in the Confirm of %s", name, call.gid)
            os.kill(os.getpid(), signal.SIGKILL)
        if order_id in faults.slow_confirm and faults.first(name, "slow", order_id):
            log.warning("injected delay: the Confirm of %s waits to be released", call.gid)
            release = faults.state_dir / marker(name, "release", order_id)

            async def released() -> bool:
                return release.exists()

            await hold(released, faults.delay)
        await apply(conn, name, call)

    async def on_cancel(conn: asyncpg.Connection, call: Call) -> None:
        await apply(conn, name, call)

    p.on_try(on_try)
    p.on_confirm(on_confirm)
    p.on_cancel(on_cancel)
    return p


class LateTry:
    """ASGI middleware: holds the Try of each chosen order back before the barrier sees
    it (a slow network) until its Cancel has crossed the barrier (at most
    ``faults.delay`` seconds), then records its answer's status and body in the marker
    file ``late-try``."""

    def __init__(self, app: ASGIApp, name: str, faults: Faults, pool: asyncpg.Pool) -> None:
        self.app = app
        self.name = name
        self.faults = faults
        self.pool = pool

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        order_id = self._late(scope)
        if order_id is None:
            return await self.app(scope, receive, send)
        # The whole call first: its initiator has given up waiting by the time it runs.
        received = [await receive()]
        while received[-1]["type"] == "http.request" and received[-1].get("more_body"):
            received.append(await receive())
        log.warning("injected delay: the Try of order %s held back until its Cancel", order_id)
        gid, branch = _header(scope, GID_HEADER), _header(scope, BRANCH_HEADER)

        async def cancelled() -> bool:
            return bool(
                await self.pool.fetchval(
                    f"SELECT count(*) FROM {BARRIER_TABLE}"
                    " WHERE gid = $1 AND branch = $2 AND op = 'cancel'",
                    gid,
                    branch,
                )
            )

        await hold(cancelled, self.faults.delay)
        answer: list[bytes] = []

        async def replay() -> Message:
            return received.pop(0) if received else await receive()

        async def recording(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer.append(str(message["status"]).encode())
            elif message["type"] == "http.response.body":
                answer.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, replay, recording)
        finally:
            self.faults.first(self.name, "late-try", order_id, b" ".join(answer).decode())

    def _late(self, scope: Scope) -> int | None:
        if scope["type"] != "http" or not scope["path"].endswith("/try"):
            return None
        order_id = order_of(_header(scope, BRANCH_HEADER))
        return order_id if order_id in self.faults.late_try else None


def _header(scope: Scope, name: str) -> str:
    header = name.lower().encode()
    return next((v.decode() for k, v in scope["headers"] if k == header), "")


def create_app(
    name: str,
    pool: asyncpg.Pool,
    token: str,
    faults: Faults,
    *,
    initiator: Initiator | None = None,
    timeout: float = 5.0,
) -> ASGIApp:
    """The participant ``name``'s app; with ``initiator``, the order service's pay too."""
    app = FastAPI(title=f"{name} (reliable-msg TCC demo)")
    app.include_router(participant(name, pool, token, faults).router(f"/tcc/{name}"))

    @app.get("/health")
    async def health() -> dict[str, str]:
        await pool.fetchval("SELECT 1")
        return {"status": "ok"}

    if initiator is not None:

        @app.post("/orders/{order_id}/pay")
        async def pay(
            order_id: int, crash: Annotated[Literal["before_commit"] | None, Query()] = None
        ) -> JSONResponse:
            return await _pay(pool, initiator, order_id, timeout, crash)

    return LateTry(app, name, faults, pool) if faults.late_try else app


async def _pay(
    pool: asyncpg.Pool, initiator: Initiator, order_id: int, deadline: float, crash: str | None
) -> JSONResponse:
    order = await pool.fetchrow("SELECT * FROM orders WHERE id = $1", order_id)
    if order is None:
        return _error(404, "not_found", f"no order {order_id}")
    try:
        async with initiator.transaction(gid(order_id), timeout=deadline) as tx:
            await tx.try_all(branches(order))
            if crash == "before_commit":
                log.warning("injected crash: the order service dies before committing %s", tx.gid)
                os.kill(os.getpid(), signal.SIGKILL)
    except TryRefused as exc:
        return _error(409, "refused", str(exc), exc.participant)
    except TryFailed as exc:
        return _error(502, "try_failed", str(exc), exc.participant)
    except ReliableMsgError as exc:
        return _error(503, "service_unavailable", f"reliable-msg: {exc}")
    return JSONResponse({"gid": tx.gid, "status": tx.status})


def _error(status: int, code: str, message: str, participant: str | None = None) -> JSONResponse:
    error = {"code": code, "message": message, "participant": participant}
    return JSONResponse({"error": error}, status_code=status)
