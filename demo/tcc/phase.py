"""The demo's TCC part, after the reliable-message part: the seed's pay-order as a TCC
global transaction, with the injected faults of :mod:`demo.tcc.plan`.

1. Reset the four participants' schemas; seed the orders (the refused one's product sold
   out).
2. Start a second instance of the service (the coordinator the order service talks to;
   the demo's first instance is the other one), credit's database behind a fault proxy,
   and the four participants, each a process (``python -m demo.tcc <name>``).
3. Pay the orders over HTTP in waves, each faulted one alone, injecting its fault.
4. Wait until the coordinator reports every transaction confirmed or cancelled; read
   the books and the coordinator's records: the :class:`~demo.tcc.verdict.TccFacts`.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from reliable_msg.harness.process import NotReady, serve_argv, wait_ready
from reliable_msg.harness.proxy import FaultProxy

from ..admin import ServiceAdmin
from ..errors import DemoError
from ..options import Options
from ..processes import Child, Supervisor, base_env, until
from ..shop import Answer, Shop
from . import books
from .plan import STRUCK, Fault, make_plan
from .shop import PARTICIPANTS, gid, marker
from .verdict import Killed, TccFacts

#: Seconds a process gets to become ready.
STARTUP = 30.0
#: Each global transaction's deadline: an initiator killed before its commit leaves its
#: transaction to be cancelled this long after its begin. Wide, as the Try's bound: on a
#: loaded machine a normal order must not miss them.
TX_TIMEOUT = 8.0
#: Each Try's bound at the initiator (the held-back Try waits for its Cancel, which
#: comes once the initiator has given up on it after this long).
TRY_TIMEOUT = 3.0
#: The most the held-back Try waits for its Cancel, and the slow Confirm for the demo to
#: have killed its coordinator: each waits on that condition, this only bounds it.
DELAY = 20.0
#: Seconds for every transaction to be confirmed or cancelled once all are paid.
SETTLE = 30.0
#: The coordinator instance the order service talks to, killed mid-confirm.
SECOND = "service-2"
#: What each fault's pay request is answered: HTTP status and error code.
ANSWERS: dict[Fault | None, tuple[int | None, str | None]] = {
    None: (200, None),
    Fault.REFUSED: (409, "refused"),
    Fault.DB_DOWN: (502, "try_failed"),
    Fault.DOWN_IN_CONFIRM: (200, None),
    Fault.INITIATOR_KILLED: (None, None),
    Fault.COORDINATOR_KILLED: (200, None),
    Fault.LATE_TRY: (502, "try_failed"),
}
FINAL = ("confirmed", "cancelled")


@dataclass(frozen=True, slots=True)
class Stage:
    """What the TCC part takes from the demo's run."""

    options: Options
    supervisor: Supervisor
    admin: ServiceAdmin  #: the demo's first service instance
    service_env: dict[str, str]  #: its environment (participants' URLs and tokens in)
    tokens: dict[str, str]  #: participant -> its token
    order_token: str  #: the producer token the order service begins transactions with
    ports: dict[str, int]  #: participant (and ``SECOND``) -> its port
    logs: Path
    state: Path
    event: Callable[[str], None]


def coordinator_env(tokens: dict[str, str], ports: dict[str, int]) -> dict[str, str]:
    """The service's ``[participants.<name>]`` token and URL of each participant."""
    env = {}
    for name, token in tokens.items():
        env[f"RMSG_PARTICIPANTS__{name.upper()}__TOKEN"] = token
        env[f"RMSG_PARTICIPANTS__{name.upper()}__URL"] = (
            f"http://127.0.0.1:{ports[name]}/tcc/{name}"
        )
    return env


class TccPart:
    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        o = stage.options
        self.plan = make_plan(o.tcc_orders, o.seed)
        target = urlsplit(o.database_url)
        self.proxy = FaultProxy(target.hostname or "127.0.0.1", target.port or 5432)
        self.unexpected = 0
        self.killed: Killed | None = None

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.stage.ports[name]}"

    async def run(self, session: aiohttp.ClientSession) -> TccFacts:
        s = self.stage
        try:
            await books.reset(
                s.options.database_url,
                self.plan.orders,
                sold_out={self.plan.of(Fault.REFUSED)},
            )
            await self.proxy.start()
            self._announce()
            await self._start()
            shop = Shop(self.url("order"), session)
            for name in PARTICIPANTS:
                await Shop(self.url(name), session).wait_healthy(STARTUP)
            s.event(f"TCC participants {', '.join(PARTICIPANTS)} ready; coordinator {SECOND} ready")
            for wave in self.plan.waves():
                await self._pay(shop, wave)
            settled = await self._settled(self.plan.orders)
            if not settled:
                s.event(f"[red]TCC transactions still unfinished after {SETTLE:.0f} s[/]")
            return await self._facts()
        finally:
            await self.proxy.close()

    # -- starting ------------------------------------------------------------------------

    def _announce(self) -> None:
        plan, event = self.plan, self.stage.event
        normal = [i for i in range(1, plan.orders + 1) if i not in plan.faults]
        event(f"TCC part: {plan.orders} orders; paid normally: {', '.join(map(str, normal))}")
        for order_id, fault in plan.faults.items():
            event(f"TCC order {order_id}: {fault.says}")

    async def _start(self) -> None:
        s = self.stage
        env = {**s.service_env, "RMSG_PORT": str(s.ports[SECOND])}
        argv = serve_argv(s.options.config, "--port", str(s.ports[SECOND]))
        self._child(SECOND, argv, env, tier=0)
        dying = {STRUCK[Fault.INITIATOR_KILLED], STRUCK[Fault.DOWN_IN_CONFIRM]}  # once each
        for name in PARTICIPANTS:
            argv = [sys.executable, "-m", "demo.tcc", name, "--port", str(s.ports[name])]
            self._child(f"tcc-{name}", argv, self._env(name), restarts=int(name in dying))
        try:
            await wait_ready(self.url(SECOND), within=STARTUP)
        except NotReady as exc:
            raise DemoError(str(exc)) from exc

    def _child(
        self, name: str, argv: list[str], env: dict[str, str], *, restarts: int = 0, tier: int = 1
    ) -> None:
        log = self.stage.logs / f"{name}.log"
        self.stage.supervisor.start(Child(name, argv, env, log, max_restarts=restarts, tier=tier))

    def _env(self, name: str) -> dict[str, str]:
        s, plan = self.stage, self.plan
        dsn = s.options.database_url
        if name == STRUCK[Fault.DB_DOWN]:
            dsn = _through(dsn, self.proxy.port)

        def ids(fault: Fault) -> str:
            return str(plan.of(fault)) if STRUCK[fault] == name else ""

        env = {
            **base_env(),
            "DEMO_DATABASE_URL": dsn,
            "DEMO_TCC_TOKEN": s.tokens[name],
            "DEMO_STATE_DIR": str(s.state),
            "DEMO_TCC_DELAY": str(DELAY),
            "DEMO_TCC_CRASH_IN_CONFIRM": ids(Fault.DOWN_IN_CONFIRM),
            "DEMO_TCC_SLOW_CONFIRM": ids(Fault.COORDINATOR_KILLED),
            "DEMO_TCC_LATE_TRY": ids(Fault.LATE_TRY),
        }
        if name == "order":
            env |= {
                "DEMO_SERVICE_URL": self.url(SECOND),
                "DEMO_ORDER_TOKEN": s.order_token,
                "DEMO_TCC_TIMEOUT": str(TX_TIMEOUT),
                "DEMO_TCC_TRY_TIMEOUT": str(TRY_TIMEOUT),
            }
        return env

    # -- paying --------------------------------------------------------------------------

    async def _pay(self, shop: Shop, wave: list[int]) -> None:
        fault = self.plan.fault(wave[0])
        if fault is None:
            answers = await asyncio.gather(*(shop.pay(i, {}) for i in wave))
            for order_id, answer in zip(wave, answers, strict=True):
                self._check(order_id, None, answer)
            first, last = wave[0], wave[-1]
            self.stage.event(
                f"TCC orders {first}-{last} paid" if last > first else f"TCC order {first} paid"
            )
            return
        order_id = wave[0]
        await getattr(self, f"_{fault.value}")(shop, order_id)

    def _check(self, order_id: int, fault: Fault | None, answer: Answer) -> None:
        status, code = ANSWERS[fault]
        if answer.status != status or (code is not None and answer.code != code):
            self.unexpected += 1
            self.stage.event(f"[red]TCC order {order_id}: unplanned answer {answer.summary}[/]")

    async def _paid(self, shop: Shop, order_id: int, fault: Fault, **query: str) -> Answer:
        answer = await shop.pay(order_id, query)
        self._check(order_id, fault, answer)
        self.stage.event(f"TCC order {order_id}: pay answered {answer.summary}")
        return answer

    async def _refused(self, shop: Shop, order_id: int) -> None:
        await self._paid(shop, order_id, Fault.REFUSED)
        await self._final(order_id)

    async def _db_down(self, shop: Shop, order_id: int) -> None:
        await self.proxy.down()
        self.stage.event("credit's database is unreachable (its proxy is down)")
        try:
            await self._paid(shop, order_id, Fault.DB_DOWN)
        finally:
            await self.proxy.up()
            self.stage.event("credit's database is reachable again")
        await self._final(order_id)

    async def _down_in_confirm(self, shop: Shop, order_id: int) -> None:
        await self._paid(shop, order_id, Fault.DOWN_IN_CONFIRM)
        tx = await self._final(order_id)
        wms: dict[str, Any] = next(
            (b for b in tx.get("branches", []) if b["participant"] == "wms"), {}
        )
        self.stage.event(
            f"TCC order {order_id}: wms's branch {wms.get('status')} after"
            f" {wms.get('attempts')} Confirm calls"
        )

    async def _initiator_killed(self, shop: Shop, order_id: int) -> None:
        await self._paid(shop, order_id, Fault.INITIATOR_KILLED, crash="before_commit")
        await shop.wait_healthy(STARTUP)
        self.stage.event(
            f"TCC order {order_id}: the order service is back; its transaction waits for"
            f" its deadline ({TX_TIMEOUT:g} s)"
        )

    async def _late_try(self, shop: Shop, order_id: int) -> None:
        await self._paid(shop, order_id, Fault.LATE_TRY)
        path = self.stage.state / marker("wms", "late-try", order_id)

        async def answered() -> bool:
            return path.exists() and path.stat().st_size > 0

        await until(answered, DELAY + 10, f"order {order_id}'s held-back Try never ended")
        self.stage.event(f"TCC order {order_id}: the late Try was answered {path.read_text()}")

    async def _coordinator_killed(self, shop: Shop, order_id: int) -> None:
        await self._paid(shop, order_id, Fault.COORDINATOR_KILLED)
        slow = self.stage.state / marker(STRUCK[Fault.COORDINATOR_KILLED], "slow", order_id)

        async def confirming() -> bool:
            return slow.exists()

        await until(confirming, STARTUP, f"order {order_id}'s slow Confirm never began")
        release = self.stage.state / marker(STRUCK[Fault.COORDINATOR_KILLED], "release", order_id)
        try:
            tx = await self.stage.admin.tcc_transaction(gid(order_id))
            child = self.stage.supervisor.kill(SECOND)
            self.killed = Killed(f"{socket.gethostname()}:{child.pid}", tx.get("status"))
        finally:
            release.touch()  # the held Confirm may finish now
        self.stage.event(
            f"TCC order {order_id}: {SECOND} killed while its transaction was {tx.get('status')}"
        )
        tx = await self._final(order_id)
        self.stage.event(f"TCC order {order_id}: {tx.get('status')} by the other instance")

    # -- waiting -------------------------------------------------------------------------

    async def _final(self, order_id: int) -> dict[str, Any]:
        """Wait until ``order_id``'s transaction is confirmed or cancelled (at most
        ``SETTLE`` seconds); its detail."""
        tx: dict[str, Any] = {}

        async def final() -> bool:
            nonlocal tx
            tx = await self.stage.admin.tcc_transaction(gid(order_id))
            return tx.get("status") in FINAL

        try:
            await until(final, SETTLE, "", every=0.1)
        except DemoError:
            self.stage.event(
                f"[red]TCC order {order_id}: still {tx.get('status')} after {SETTLE:.0f} s[/]"
            )
        return tx

    async def _settled(self, count: int) -> bool:
        async def settled() -> bool:
            txs = await self.stage.admin.tcc_transactions()
            return len(txs) == count and all(t["status"] in FINAL for t in txs.values())

        try:
            await until(settled, SETTLE, "", every=0.25)
        except DemoError:
            return False
        return True

    async def _facts(self) -> TccFacts:
        s, plan = self.stage, self.plan
        transactions = await s.admin.tcc_transactions()
        events = {}
        for order_id in plan.faults:
            if gid(order_id) in transactions:
                events[order_id] = (await s.admin.tcc_transaction(gid(order_id)))["events"]
        late = s.state / marker("wms", "late-try", plan.of(Fault.LATE_TRY))
        return TccFacts(
            plan=plan,
            books=await books.read(s.options.database_url),
            transactions={g: t["status"] for g, t in transactions.items()},
            stalled=sum(bool(t.get("stalled")) for t in transactions.values()),
            unexpected_answers=self.unexpected,
            restarts={
                n: c.restarts for n, c in s.supervisor.children.items() if n.startswith("tcc-")
            },
            events=events,
            late_try=late.read_text() if late.exists() else None,
            killed=self.killed,
        )


def _through(dsn: str, port: int) -> str:
    """``dsn`` with its host and port replaced by the proxy's."""
    parts = urlsplit(dsn)
    userinfo = parts.netloc.rpartition("@")[0]
    at = f"{userinfo}@" if userinfo else ""
    return parts._replace(netloc=f"{at}127.0.0.1:{port}").geturl()
