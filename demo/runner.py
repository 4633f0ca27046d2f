"""One run of the demo, from a clean slate to the verdict.

1. Reset: the demo's RabbitMQ objects and service database are removed, the service
   database migrated afresh, the demo schemas emptied and seeded.
2. Start the service and the order service; create the orders over HTTP.
3. Plan the failures over the order ids (:mod:`demo.plan`); start the three consumers,
   told which orders to die after.
4. Pay every order over HTTP, in waves, with the planned failures; the supervisor
   restarts whatever dies. With the outage (the default), RabbitMQ is stopped once a
   third of the orders is paid, the next third is paid while it is down, and it is
   started again for the rest (:mod:`demo.plan`).
5. Wait until the service reports every message ``done`` or ``cancelled``; after an
   outage, also until the service's switch is back to normal, the Redis shards are empty
   and every consumer is back on RabbitMQ. Then read the books and judge them
   (:mod:`demo.verdict`).

Every process started is stopped at the end, and RabbitMQ started again if the run
stopped it, whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import aiohttp
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from downstream_demo.worker import crash_marker
from reliable_msg.errors import ReliableMsgError
from reliable_msg.harness.ports import free_ports
from reliable_msg.harness.process import NotReady, serve_argv, wait_ready

from . import books, rabbit, report
from .admin import ServiceAdmin
from .errors import DemoError
from .options import Names, Options
from .outage import (
    FALLBACK_WRITES,
    ConsumerPath,
    OutageFacts,
    Source,
    consumer_path,
    counter,
    flips,
)
from .plan import Phases, Plan, make_plan, phases, waves
from .processes import Child, Supervisor, base_env, until
from .shop import Answer, Shop
from .slate import fresh_slate
from .tcc.phase import SECOND, Stage, TccPart, coordinator_env
from .tcc.shop import PARTICIPANTS
from .tcc.verdict import TccFacts, tcc_summary
from .tcc.verdict import judge as judge_tcc
from .verdict import Facts, Outcome, judge

#: Seconds a process gets to become ready.
STARTUP = 30.0
#: Seconds to wait for the consumers to drain their queues once every message settled.
DRAIN = 10.0
#: The producer the demo config declares for the order service.
PRODUCER = "order"
#: Seconds RabbitMQ stays down at most, waiting for the consumers to handle through
#: Redis every message paid so far.
OUTAGE_SETTLE = 30.0
#: Seconds, after every message settled, for the outage to heal: the switch back to
#: normal, the Redis shards empty, every consumer back on RabbitMQ.
RECOVERY = 60.0
#: Seconds before a consumer takes over a Redis entry read by a consumer that died.
CLAIM_IDLE = 5.0
#: The service's ``/metrics`` text, in the run directory: while RabbitMQ is down and the
#: orders of the outage phase are paid, and at the end.
OUTAGE_METRICS = "metrics-outage.txt"
END_METRICS = "metrics-end.txt"
#: How often the outage's progress is looked at.
WATCH_EVERY = 0.25

#: Each order's pay answer: True when it was the planned one.
Answers = dict[int, bool]


@dataclass(frozen=True, slots=True)
class Tokens:
    """Every token of the run, generated at start; they reach the processes by env."""

    admin: str
    order: str
    groups: dict[str, str]
    #: the TCC participants' (``tcc_<name>`` in the fingerprints)
    participants: dict[str, str] = field(default_factory=dict)

    @classmethod
    def generate(cls, groups: Sequence[str], participants: Sequence[str] = ()) -> Tokens:
        """Fresh random tokens; ``DEMO_ADMIN_TOKEN``, ``DEMO_ORDER_TOKEN``,
        ``DEMO_<GROUP>_TOKEN`` and ``DEMO_TCC_<PARTICIPANT>_TOKEN`` in the environment
        give them instead (for a test that looks for them in every log of the run)."""

        def token(name: str) -> str:
            return os.environ.get(f"DEMO_{name.upper()}_TOKEN") or secrets.token_urlsafe(24)

        return cls(
            admin=token("admin"),
            order=token("order"),
            groups={g: token(g) for g in groups},
            participants={p: token(f"tcc_{p}") for p in participants},
        )

    def fingerprints(self) -> dict[str, str]:
        """Which tokens the run used, without them: the first 12 hex digits of each one's
        SHA-256."""
        tcc = {f"tcc_{p}": t for p, t in self.participants.items()}
        named = {"admin": self.admin, "order": self.order, **self.groups, **tcc}
        return {n: hashlib.sha256(t.encode()).hexdigest()[:12] for n, t in named.items()}


class Topology(Protocol):
    """Where the demo's processes find their databases, RabbitMQ and Redis."""

    @property
    def database_url(self) -> str: ...
    @property
    def amqp_url(self) -> str: ...
    @property
    def redis_url(self) -> str: ...
    @property
    def names(self) -> Names: ...
    @property
    def shards(self) -> int: ...
    @property
    def poll_interval(self) -> float: ...


def order_service_env(t: Topology, service_url: str, token: str) -> dict[str, str]:
    """The order service's environment (:mod:`upstream_demo.config`)."""
    return {
        **base_env(),
        "DEMO_DATABASE_URL": t.database_url,
        "DEMO_SERVICE_URL": service_url,
        "DEMO_ORDER_TOKEN": token,
    }


def consumer_env(
    t: Topology,
    group: str,
    *,
    service_url: str,
    token: str,
    state_dir: Path,
    crashes: frozenset[int],
) -> dict[str, str]:
    """A consumer group's environment (:mod:`downstream_demo.config`), told to die once
    after the effect of each order in ``crashes``."""
    return {
        **base_env(),
        "DEMO_DATABASE_URL": t.database_url,
        "DEMO_SERVICE_URL": service_url,
        f"DEMO_{group.upper()}_TOKEN": token,
        "DEMO_AMQP_URL": t.amqp_url,
        "DEMO_QUEUE_PREFIX": t.names.queue_prefix,
        "DEMO_REDIS_URL": t.redis_url,
        "DEMO_NAMESPACE": t.names.namespace,
        "DEMO_SHARDS": str(t.shards),
        "DEMO_POLL_INTERVAL": str(t.poll_interval),
        "DEMO_CLAIM_IDLE": str(CLAIM_IDLE),
        "DEMO_STATE_DIR": str(state_dir),
        "DEMO_CRASH_AFTER_EFFECT": ",".join(map(str, sorted(crashes))),
    }


class Run:
    def __init__(self, options: Options, console: Console) -> None:
        self.options = options
        self.console = console
        # The config declares the participants: their tokens even when the TCC part is off.
        self.tokens = Tokens.generate(options.groups, PARTICIPANTS)
        self.service_port, self.order_port = free_ports(2)
        #: the TCC participants' and the second service instance's ports
        self.tcc_ports = dict(zip((*PARTICIPANTS, SECOND), free_ports(5), strict=True))
        self.logs = options.run_dir / "logs"
        self.state = options.run_dir / "state"
        self.supervisor = Supervisor(self._event)
        #: When the run started: monotonic, and epoch for the switch's history.
        self.started = time.monotonic()
        self.started_epoch = time.time()
        self.outage = rabbit.Outage(options.amqp_url, self.logs / "rabbitmqctl.log", self.started)
        self._watch: asyncio.Task[None] | None = None
        #: Messages done or cancelled when RabbitMQ was started again.
        self.settled_while_down = 0

    @property
    def service_url(self) -> str:
        return f"http://127.0.0.1:{self.service_port}"

    @property
    def order_url(self) -> str:
        return f"http://127.0.0.1:{self.order_port}"

    async def main(self) -> int:
        """Run the demo; the exit status: 0 balanced and as planned, 1 not, 2 timed out,
        128 + the signal number when interrupted by SIGINT or SIGTERM."""
        self.logs.mkdir(parents=True, exist_ok=True)
        self.state.mkdir(parents=True, exist_ok=True)
        outage = ", RabbitMQ stopped mid-run" if self.options.outage else ""
        self.console.rule(f"reliable-msg e-commerce demo: {self.options.orders} orders{outage}")
        self.console.print(f"logs, state and report in {self.options.run_dir}")
        self.supervisor.cancel_on_signals()
        try:
            await self._reset()
            return await self.supervisor.run(self._scenario())
        except asyncio.CancelledError:
            interrupted = self.supervisor.interrupted
            if interrupted is None:
                raise
            self.console.print(f"interrupted by {interrupted.name}")
            return 128 + interrupted.value
        finally:
            try:
                await self._restore_rabbitmq()
            finally:
                self.supervisor.stop_all()
                self.console.print("every process the demo started is stopped")

    async def _restore_rabbitmq(self) -> None:
        """Start RabbitMQ again if the run stopped it and did not start it (an error or a
        signal in the outage phase); wait until it answers."""
        if not self.outage.down:
            return
        self.console.print("starting RabbitMQ again (rabbitmqctl start_app)")
        await self.outage.restore()
        self.console.print("RabbitMQ answers again")

    # -- 1. reset ------------------------------------------------------------------------

    async def _reset(self) -> None:
        o = self.options
        with self.console.status("resetting the demo's databases and queues"):
            await fresh_slate(
                amqp_url=o.amqp_url,
                redis_url=o.redis_url,
                names=o.names,
                groups=o.groups,
                service_database_url=o.service_database_url,
                database_url=o.database_url,
                orders=o.orders,
                migrate=self._reliable_msg("migrate"),
                env=self._service_env(),
                log=self.logs / "migrate.log",
            )
        self.console.print(
            f"reset: {o.orders} products at {books.STOCK} and {o.orders} members at"
            f" {books.POINTS} points in {o.database_url}; service database"
            f" {o.service_database_url} migrated; RabbitMQ names {o.names.exchange}*,"
            f" Redis namespace {o.names.namespace}"
        )

    # -- 2.-5. the scenario --------------------------------------------------------------

    async def _scenario(self) -> int:
        admin = ServiceAdmin(self.service_url, self.tokens.admin)
        connector = aiohttp.TCPConnector(force_close=True)  # no stale keep-alive after a kill
        timeout = aiohttp.ClientTimeout(total=30)
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                shop = Shop(self.order_url, session)
                await self._start_service()
                await self._start_order_service(shop)
                with self._progress() as progress:
                    ids = await self._create_orders(shop, progress)
                    plan = make_plan(ids, self.options.groups, self.options.seed)
                    split = phases(ids, outage=self.options.outage)
                    self._announce(plan, split)
                    await self._start_consumers(plan)
                    answers = await self._pay(shop, split, plan, admin, progress)
                    settled = await self._settle(admin, len(ids), progress)
                healed = settled and await self._recovered(admin, split)
                if healed:
                    await self._drain()
                facts = await self._facts(admin, plan, split, answers)
                tcc = None
                if settled and self.options.tcc_orders:
                    tcc = await TccPart(self._stage(admin)).run(session)
        finally:
            await self._stop_watching()
            await admin.close()
        outcome = judge(facts)
        tcc_outcome = judge_tcc(tcc) if tcc is not None else None
        self._report(outcome, facts, timed_out=not settled, tcc=(tcc_outcome, tcc))
        return exit_status(outcome, settled=settled, tcc=tcc_outcome)

    def _stage(self, admin: ServiceAdmin) -> Stage:
        return Stage(
            options=self.options,
            supervisor=self.supervisor,
            admin=admin,
            service_env=self._service_env(),
            tokens=self.tokens.participants,
            order_token=self.tokens.order,
            ports=self.tcc_ports,
            logs=self.logs,
            state=self.state,
            event=self._event,
        )

    async def _start_service(self) -> None:
        argv = serve_argv(self.options.config, "--port", str(self.service_port))
        self._start("service", argv, self._service_env(), tier=0)
        try:
            await wait_ready(self.service_url, within=STARTUP)
        except NotReady as exc:
            raise DemoError(str(exc)) from exc
        self._event(f"service ready at {self.service_url}")

    async def _start_order_service(self, shop: Shop) -> None:
        env = order_service_env(self.options, self.service_url, self.tokens.order)
        argv = [sys.executable, "-m", "upstream_demo", "--port", str(self.order_port)]
        self._start(PRODUCER, argv, env)
        await shop.wait_healthy(STARTUP)
        self._event(f"order service ready at {self.order_url}")

    async def _start_consumers(self, plan: Plan) -> None:
        o = self.options
        for group in o.groups:
            env = consumer_env(
                o,
                group,
                service_url=self.service_url,
                token=self.tokens.groups[group],
                state_dir=self.state,
                crashes=plan.consumer_crashes[group],
            )
            argv = [sys.executable, "-m", "downstream_demo", group]
            self._start(group, argv, env, restarts=len(plan.consumer_crashes[group]))

        async def consuming() -> bool:
            states = await rabbit.queue_states(o.amqp_url, o.names, o.groups)
            return all(s.consumers > 0 for s in states.values())

        await until(consuming, STARTUP, "the consumers did not start consuming")
        self._event(f"consumers {', '.join(o.groups)} consuming")

    async def _create_orders(self, shop: Shop, progress: Progress) -> list[int]:
        task = progress.add_task("creating orders", total=self.options.orders)
        limit = asyncio.Semaphore(self.options.concurrency)

        async def create(i: int) -> int:
            async with limit:
                order_id = await shop.create(i, books.sku(i), books.QTY, books.PRICE * books.QTY)
            progress.advance(task)
            return order_id

        return list(await asyncio.gather(*(create(i) for i in range(1, self.options.orders + 1))))

    def _announce(self, plan: Plan, split: Phases) -> None:
        self.supervisor.children[PRODUCER].max_restarts = len(plan.upstream_crashes)
        self._event(f"local transaction fails for orders {_ids(plan.local_failures)}")
        self._event(f"order service dies after commit for orders {_ids(plan.upstream_crashes)}")
        for group, ids in plan.consumer_crashes.items():
            self._event(f"{group} dies after its effect for orders {_ids(ids)}")
        if split.during:
            during = split.during
            self._event(
                f"RabbitMQ is stopped while orders {during[0]}-{during[-1]} are paid"
                f" ({len(during)} of {split.orders})"
            )

    async def _pay(
        self, shop: Shop, split: Phases, plan: Plan, admin: ServiceAdmin, progress: Progress
    ) -> Answers:
        """Pay every order, phase by phase; RabbitMQ is down during ``split.during``."""
        task = progress.add_task("paying orders", total=split.orders)
        answers = await self._pay_all(shop, split.before, plan, progress, task)
        if split.during:
            self._watch = asyncio.create_task(self._watch_outage(admin))
            self._event(
                f"{len(split.before)} orders paid: stopping RabbitMQ (rabbitmqctl stop_app)"
            )
            try:
                await self.outage.stop()
                self._event("RabbitMQ stopped: paying orders while it is down")
                answers |= await self._pay_all(shop, split.during, plan, progress, task)
                await self._save_metrics(admin, OUTAGE_METRICS)
                await self._settle_while_down(admin, split, progress)
            finally:
                self._event("starting RabbitMQ again (rabbitmqctl start_app)")
                await self.outage.restore()
                self._event(f"RabbitMQ answers again, after {self._downtime():.1f} s down")
        answers |= await self._pay_all(shop, split.after, plan, progress, task)
        return answers

    async def _pay_all(
        self, shop: Shop, ids: list[int], plan: Plan, progress: Progress, task: TaskID
    ) -> Answers:
        """Pay ``ids`` in waves; whether each answer was the planned one."""
        limit = asyncio.Semaphore(self.options.concurrency)

        async def pay(order_id: int) -> bool:
            async with limit:
                answer = await shop.pay(order_id, plan.query(order_id))
            progress.advance(task)
            return self._as_planned(plan, order_id, answer)

        answers: Answers = {}
        for wave in waves(ids, plan):
            if wave[0] in plan.upstream_crashes:
                answers[wave[0]] = await self._pay_and_crash(shop, wave[0])
                progress.advance(task)
            else:
                answers.update(zip(wave, await asyncio.gather(*map(pay, wave)), strict=True))
        return answers

    async def _settle_while_down(
        self, admin: ServiceAdmin, split: Phases, progress: Progress
    ) -> None:
        """Keep RabbitMQ down until the consumers handled every message so far through
        Redis (a consumer killed meanwhile included), or for ``OUTAGE_SETTLE`` at most."""
        total = len(split.before) + len(split.during)
        label = "settled while RabbitMQ is down"
        if not await self._settle(admin, total, progress, label, within=OUTAGE_SETTLE):
            self._event(f"[red]messages still unsettled after {OUTAGE_SETTLE:.0f} s down[/]")
        with contextlib.suppress(ReliableMsgError):
            counts = await admin.message_counts()
            self.settled_while_down = counts.get("done", 0) + counts.get("cancelled", 0)

    async def _save_metrics(self, admin: ServiceAdmin, name: str) -> None:
        """Keep the service's ``/metrics`` text as it is now in the run directory."""
        (self.options.run_dir / name).write_text(await admin.metrics())

    def _downtime(self) -> float:
        o = self.outage
        if o.stopped_at is None or o.answering_at is None:
            return 0.0
        return o.answering_at - o.stopped_at

    def _as_planned(self, plan: Plan, order_id: int, answer: Answer) -> bool:
        if order_id in plan.local_failures:
            ok = answer.status == 500 and answer.code == "payment_failed"
        else:
            ok = answer.status == 200 and answer.body.get("status") == "paid"
        if not ok:
            self._event(f"[red]order {order_id}: unplanned answer {answer.summary}[/]")
        return ok

    async def _pay_and_crash(self, shop: Shop, order_id: int) -> bool:
        answer = await shop.pay(order_id, {"crash": "after_commit"})
        if answer.status is not None:
            self._event(f"[red]order {order_id}: the order service answered {answer.summary}[/]")
            return False
        await shop.wait_healthy(STARTUP)
        after = await shop.get(order_id)
        self._event(
            f"order {order_id}: the order service died after its commit, before the confirm;"
            f" after the restart the order is {after.body.get('status')}: check-back will send"
            " order.paid"
        )
        return after.body.get("status") == "paid"

    async def _settle(
        self,
        admin: ServiceAdmin,
        total: int,
        progress: Progress,
        label: str = "messages done or cancelled",
        within: float | None = None,
    ) -> bool:
        """Wait until no message is pending or sent; False on time-out."""
        task = progress.add_task(label, total=total)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.options.timeout if within is None else within)
        while loop.time() < deadline:
            try:
                counts = await admin.message_counts()
            except ReliableMsgError as exc:
                self._event(f"[yellow]GET /v1/stats failed ({exc}); asking again[/]")
            else:
                done = counts.get("done", 0) + counts.get("cancelled", 0)
                progress.update(task, completed=done)
                if counts and counts.get("pending", 0) == 0 and counts.get("sent", 0) == 0:
                    return True
            await asyncio.sleep(0.25)
        return False

    # -- the outage healing -----------------------------------------------------------

    async def _watch_outage(self, admin: ServiceAdmin) -> None:
        """Tell the service's switch flips and the consumers' moves as they happen."""
        mode = "normal"
        paths = {g: self._path(g) for g in self.options.groups}
        while True:
            await asyncio.sleep(WATCH_EVERY)
            with contextlib.suppress(ReliableMsgError):
                broker = await admin.broker()
                if broker.get("mode", mode) != mode:
                    mode = broker["mode"]
                    reason = (broker.get("switch") or {}).get("reason")
                    self._event(f"the service's switch is now [bold]{mode}[/] ({reason})")
            for group, before in paths.items():
                paths[group] = now = self._path(group)
                if now.to_redis > before.to_redis:
                    self._event(f"consumer {group} now consumes the Redis fallback shards")
                if now.to_rabbitmq > before.to_rabbitmq:
                    self._event(f"consumer {group} drained the Redis shards: back on RabbitMQ")

    async def _stop_watching(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None

    async def _recovered(self, admin: ServiceAdmin, split: Phases) -> bool:
        """After an outage, wait until it healed: the switch back to normal, the Redis
        shards empty and every consumer back on its RabbitMQ queue. False on time-out."""
        if not split.during:
            return True
        o = self.options

        async def healed() -> bool:
            broker = await admin.broker()
            depth = broker.get("fallback_depth") or {}
            if broker.get("mode") != "normal" or any(depth.get(g) != 0 for g in o.groups):
                return False
            if any(self._path(g).now is not Source.RABBITMQ for g in o.groups):
                return False
            states = await rabbit.queue_states(o.amqp_url, o.names, o.groups)
            return all(s.consumers > 0 for s in states.values())

        try:
            await until(healed, RECOVERY, "the outage did not heal", every=WATCH_EVERY)
        except DemoError:
            self._event(f"[red]the outage did not heal within {RECOVERY:.0f} s[/]")
            return False
        finally:
            await self._stop_watching()
        self._event("the outage healed: switch normal, Redis shards empty, consumers on RabbitMQ")
        return True

    def _path(self, group: str) -> ConsumerPath:
        try:
            log = (self.logs / f"{group}.log").read_text(errors="replace")
        except OSError:
            log = ""
        return consumer_path(log, group)

    async def _drain(self) -> None:
        """Let the consumers take what is still queued (duplicates, by now), so that a
        double effect would be in the books before they are read."""
        o = self.options

        async def drained() -> bool:
            states = await rabbit.queue_states(o.amqp_url, o.names, o.groups)
            return all(s.ready == 0 for s in states.values())

        await until(drained, DRAIN, "the consumers did not drain their queues")
        await asyncio.sleep(0.5)

    async def _facts(
        self, admin: ServiceAdmin, plan: Plan, split: Phases, answers: Answers
    ) -> Facts:
        await self._save_metrics(admin, END_METRICS)
        o = self.options
        crashes = {
            g: sum((self.state / crash_marker(g, i)).exists() for i in plan.consumer_crashes[g])
            for g in o.groups
        }
        return Facts(
            groups=o.groups,
            plan=plan,
            books=await books.read(o.database_url, o.groups),
            messages=await admin.message_statuses(),
            counts=await admin.message_counts(),
            crashes=crashes,
            restarts={name: c.restarts for name, c in self.supervisor.children.items()},
            unexpected_answers=sum(not ok for ok in answers.values()),
            outage=await self._outage_facts(admin, plan, split, answers),
        )

    async def _outage_facts(
        self, admin: ServiceAdmin, plan: Plan, split: Phases, answers: Answers
    ) -> OutageFacts | None:
        if not split.during:
            return None
        broker = await admin.broker()
        service = self.supervisor.children["service"].proc
        paid = [i for i in split.during if answers.get(i) and i not in plan.local_failures]
        return OutageFacts(
            stopped_at=self.outage.stopped_at,
            started_at=self.outage.started_at,
            answering_at=self.outage.answering_at,
            planned_paid=len(plan.expected_paid(split.during)),
            paid=len(paid),
            settled=self.settled_while_down,
            planned_settled=len(split.before) + len(split.during),
            confirmed=len([i for i in paid if i not in plan.upstream_crashes]),
            history=flips(
                broker.get("history") or [],
                since=self.started_epoch,
                service_pid=service.pid if service is not None else None,
            ),
            mode=broker.get("mode"),
            depth=broker.get("fallback_depth") or {},
            writes=counter(await admin.metrics(), FALLBACK_WRITES, "group"),
            paths={g: self._path(g) for g in self.options.groups},
        )

    # -- reporting -----------------------------------------------------------------------

    def _report(
        self,
        outcome: Outcome,
        facts: Facts,
        *,
        timed_out: bool,
        tcc: tuple[Outcome | None, TccFacts | None] = (None, None),
    ) -> None:
        title = f"E-commerce demo: {self.options.orders} orders, seed {self.options.seed}"
        if facts.outage is not None:
            title += ", RabbitMQ stopped mid-run"
        self.console.print(report.table(outcome, title))
        tcc_outcome, tcc_facts = tcc
        if tcc_outcome is not None and tcc_facts is not None:
            title = f"TCC pay-order: {tcc_facts.plan.orders} orders, seed {self.options.seed}"
            self.console.print(report.table(tcc_outcome, title))
        report.verdict(self.console, outcome, timed_out)
        if tcc_outcome is not None:
            report.tcc_verdict(self.console, tcc_outcome)
        elif self.options.tcc_orders:
            self.console.print("[bold red]TCC part not run[/]: the messages did not settle")
        summary = {
            "balanced": outcome.balanced,
            "as_planned": outcome.as_planned,
            "timed_out": timed_out,
            "plan": {
                "local_failures": sorted(facts.plan.local_failures),
                "upstream_crashes": sorted(facts.plan.upstream_crashes),
                "consumer_crashes": {g: sorted(i) for g, i in facts.plan.consumer_crashes.items()},
            },
            "restarts": facts.restarts,
            "tokens": self.tokens.fingerprints(),
            "outage": asdict(facts.outage) if facts.outage is not None else None,
            "checks": [asdict(c) | {"ok": c.ok} for c in outcome.checks],
            "tcc": tcc_summary(*tcc),
        }
        run_dir = self.options.run_dir
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.console.save_text(str(run_dir / "report.txt"), clear=False)

    # -- plumbing ------------------------------------------------------------------------

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
        )

    def _event(self, text: str) -> None:
        self.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {text}", highlight=False)

    def _start(
        self, name: str, argv: list[str], env: dict[str, str], *, restarts: int = 0, tier: int = 1
    ) -> None:
        log = self.logs / f"{name}.log"
        self.supervisor.start(Child(name, argv, env, log, max_restarts=restarts, tier=tier))

    def _reliable_msg(self, *command: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "reliable_msg",
            "--config",
            str(self.options.config),
            *command,
        ]

    def _service_env(self) -> dict[str, str]:
        o = self.options
        check_url = f"{self.order_url}/rmsg/check-back"
        return {
            **base_env(),
            "RMSG_DATABASE_URL": o.service_database_url,
            "RMSG_AMQP_URL": o.amqp_url,
            "RMSG_PORT": str(self.service_port),
            "RMSG_EXCHANGE": o.names.exchange,
            "RMSG_DEAD_LETTER_EXCHANGE": o.names.dead_letter_exchange,
            "RMSG_QUEUE_PREFIX": o.names.queue_prefix,
            "RMSG_REDIS_URL": o.redis_url,
            "RMSG_FALLBACK__NAMESPACE": o.names.namespace,
            "RMSG_LOG_LEVEL": "info",
            # The other processes log text; DEMO_SERVICE_LOG_FORMAT=json shows the other format.
            "RMSG_LOG_FORMAT": os.environ.get("DEMO_SERVICE_LOG_FORMAT", "text"),
            "RMSG_ADMIN_TOKEN": self.tokens.admin,
            f"RMSG_PRODUCERS__{PRODUCER.upper()}__TOKEN": self.tokens.order,
            f"RMSG_PRODUCERS__{PRODUCER.upper()}__CHECK_URL": check_url,
            **{f"RMSG_GROUPS__{g.upper()}__TOKEN": t for g, t in self.tokens.groups.items()},
            **coordinator_env(self.tokens.participants, self.tcc_ports),
        }


def exit_status(outcome: Outcome, *, settled: bool, tcc: Outcome | None = None) -> int:
    """The demo's exit status for a run that got to its verdict: 0 the books balance and
    every injected failure healed as planned (the TCC part's too, given its ``tcc``
    outcome), 1 not, 2 the messages did not settle."""
    if not settled:
        return 2
    ok = outcome.balanced and outcome.as_planned
    return 0 if ok and (tcc is None or (tcc.balanced and tcc.as_planned)) else 1


def _ids(ids: frozenset[int]) -> str:
    return ", ".join(map(str, sorted(ids)))
