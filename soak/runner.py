"""One soak run, from a clean slate to the report.

1. Reset: the run's RabbitMQ objects, Redis namespace and service database removed, the
   service database migrated afresh, the demo schemas emptied and seeded.
2. Start a fault proxy in front of RabbitMQ and a balancer in front of the service; two
   service instances (their RabbitMQ traffic through the proxy), the order service and
   the three consumers (their service calls through the balancer).
   With TCC transactions: three participants, each behind a fault proxy of its own
   (:mod:`soak.tcc`).
3. Create the orders, plan the faults (:mod:`soak.plan`), pay every order with
   ``concurrency`` payments in flight, retrying a payment that got no definitive answer
   as a customer would, while the TCC transactions (:mod:`soak.tcc_plan`) run beside
   them. At each fault's moment the fault is injected in the background
   (:mod:`soak.faults`) while the payments go on; the supervisor restarts what dies.
4. Wait for quiescence: no message pending or sent, the switch normal, the Redis shards
   and the queues empty, every TCC transaction confirmed or cancelled. Read the books,
   tally (:mod:`soak.report`, :mod:`soak.tcc_books`), print and save the report.

Whatever happens, every process is stopped and every dependency a fault took away is
given back (RabbitMQ started, PostgreSQL started, the proxy flowing) before it exits.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import deque
from collections.abc import Sequence
from urllib.parse import urlsplit

import aiohttp
import asyncpg
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from demo import books, rabbit
from demo.admin import ServiceAdmin
from demo.errors import DemoError
from demo.processes import Child, Supervisor, base_env, until
from demo.runner import PRODUCER, Tokens, consumer_env, order_service_env
from demo.shop import Shop
from demo.slate import fresh_slate
from reliable_msg.harness.ports import free_ports
from reliable_msg.harness.process import NotReady, serve_argv, wait_ready
from reliable_msg.harness.proxy import FaultProxy

from .faults import Injector
from .messages import pay_one, quiescence
from .options import Options
from .plan import INSTANCES, TCC_KINDS, Fault, Kind, Plan, make_plan
from .report import FaultRecord, Report, tally
from .tcc import PORTS as TCC_PORTS
from .tcc import TccSide

#: Seconds a process gets to become ready.
STARTUP = 60.0
#: Restarts allowed per process beyond the kills the run injects: a dependency fault
#: may crash a process (each restart is reported).
SPARE_RESTARTS = 50
#: Seconds the run stays quiet after quiescence before it reads the books, so that a
#: late duplicate would be in them.
SETTLE = 2.0


class Run:
    def __init__(self, options: Options, console: Console) -> None:
        self.o = options
        self.console = console
        self.tokens = Tokens.generate(options.groups)
        self.logs = options.run_dir / "logs"
        self.state = options.run_dir / "state"
        self.supervisor = Supervisor(self._event)
        self.started = time.monotonic()
        ports = free_ports(3 + INSTANCES + TCC_PORTS)
        self.order_port, proxy_port, balancer_port, *self.instance_ports = ports[: 3 + INSTANCES]
        amqp = urlsplit(options.amqp_url)
        self.rabbit_proxy = FaultProxy(
            amqp.hostname or "127.0.0.1", amqp.port or 5672, port=proxy_port
        )
        first, *others = [("127.0.0.1", port) for port in self.instance_ports]
        self.balancer = FaultProxy(*first, more_targets=others, port=balancer_port)
        self.outage = rabbit.Outage(options.amqp_url, self.logs / "faults.log", self.started)
        self.records: list[FaultRecord] = []
        self._injector: Injector | None = None
        self.tcc = TccSide(
            options,
            ports=ports[3 + INSTANCES :],
            logs=self.logs,
            supervisor=self.supervisor,
            event=self._event,
            restarts=SPARE_RESTARTS,
        )

    @property
    def service_url(self) -> str:
        return self.balancer.url("http")

    @property
    def order_url(self) -> str:
        return f"http://127.0.0.1:{self.order_port}"

    async def main(self) -> int:
        """Run; the exit status: 0 passed, 1 failed, 2 no quiescence in time, 3 could
        not run (raised as :class:`DemoError`), 128 + the signal when interrupted."""
        self.logs.mkdir(parents=True, exist_ok=True)
        self.state.mkdir(parents=True, exist_ok=True)
        o = self.o
        self.console.rule(
            f"reliable-msg soak: {o.messages} messages, {o.transactions} TCC transactions,"
            f" {o.faults} environment faults,"
            f" {o.crashes} crash(es) of each process, seed {o.seed}"
        )
        self.console.print(f"logs and report in {o.run_dir}")
        self.supervisor.cancel_on_signals()
        try:
            await self.rabbit_proxy.start()
            await self.balancer.start()
            await self.tcc.open()
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
                if self._injector is not None:
                    self.console.print("giving back every dependency a fault took away")
                    await self._injector.restore()
            finally:
                self.supervisor.stop_all()
                await self.tcc.close()
                await self.balancer.close()
                await self.rabbit_proxy.close()
                self.console.print("every process the run started is stopped")

    # -- 1. reset ------------------------------------------------------------------------

    async def _reset(self) -> None:
        o = self.o
        with self.console.status("resetting the run's databases, queues and Redis keys"):
            await fresh_slate(
                amqp_url=o.amqp_url,
                redis_url=o.redis_url,
                names=o.names,
                groups=o.groups,
                service_database_url=o.service_database_url,
                database_url=o.database_url,
                orders=o.messages,
                migrate=self._reliable_msg("migrate"),
                env=self._service_env(0),
                log=self.logs / "migrate.log",
            )
            await self.tcc.reset()

    # -- 2.-4. the scenario --------------------------------------------------------------

    async def _scenario(self) -> int:
        admin = ServiceAdmin(self.service_url, self.tokens.admin)
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        timeout = aiohttp.ClientTimeout(total=30)
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                shop = Shop(self.order_url, session)
                await self._start_services()
                await self._start_order_service(shop)
                await self.tcc.start(STARTUP)
                ids = await self._create_orders(shop)
                kinds = [k for k in Kind if self.tcc.enabled or k not in TCC_KINDS]
                o = self.o
                plan = make_plan(
                    ids, o.groups, faults=o.faults, crashes=o.crashes, seed=o.seed, kinds=kinds
                )
                self._announce(plan)
                self._injector = self._make_injector()
                await self._start_consumers(plan)
                self.tcc.start_load(len(ids), self.service_url, self.tokens.order)
                paying_from = time.monotonic()
                await self._pay(shop, ids, plan)
                paid_at = time.monotonic()
                quiet, tcc_quiet = await asyncio.gather(
                    quiescence(admin, self.o, self._progress, self._event), self.tcc.settle()
                )
                quiet_at = time.monotonic()
                await asyncio.sleep(SETTLE)
                result = tally(
                    await books.read(o.database_url, o.groups),
                    await admin.message_statuses(),
                    o.groups,
                )
                tcc_result = await self.tcc.tally()
        finally:
            await self.tcc.stop()
            await admin.close()
        report = Report(
            title=f"Soak: {self.o.messages} messages, seed {self.o.seed}",
            tally=result,
            faults=self.records,
            restarts={n: c.restarts for n, c in self.supervisor.children.items()},
            planned_kills=self._planned_kills(plan),
            paying=paid_at - paying_from,
            quiescence=quiet_at - paid_at if quiet else None,
            elapsed=time.monotonic() - self.started,
            tcc=tcc_result,
            tcc_quiescence=tcc_quiet,
        )
        self._report(report)
        if not quiet or (self.tcc.enabled and tcc_quiet is None):
            return 2
        return 0 if report.passed else 1

    def _make_injector(self) -> Injector:
        admin_dsn = urlsplit(self.o.database_url)._replace(path="/postgres").geturl()
        return Injector(
            instances=[self.supervisor.children[f"service-{i}"] for i in range(INSTANCES)],
            proxy=self.rabbit_proxy,
            participants=self.tcc.children,
            participant_proxies=self.tcc.proxies,
            outage=self.outage,
            admin_dsn=admin_dsn,
            databases=[_db_name(self.o.database_url), _db_name(self.o.service_database_url)],
            log=self.logs / "faults.log",
        )

    async def _start_services(self) -> None:
        for i, port in enumerate(self.instance_ports):
            argv = serve_argv(self.o.config, "--port", str(port))
            self._start(f"service-{i}", argv, self._service_env(i), tier=0)
        for i, port in enumerate(self.instance_ports):
            try:
                await wait_ready(f"http://127.0.0.1:{port}", within=STARTUP)
            except NotReady as exc:
                raise DemoError(f"service-{i}: {exc}") from exc
        self._event(
            f"service-0 and service-1 ready, behind the balancer at {self.service_url};"
            f" their RabbitMQ connections go through the fault proxy on port"
            f" {self.rabbit_proxy.port}"
        )

    async def _start_order_service(self, shop: Shop) -> None:
        env = order_service_env(self.o, self.service_url, self.tokens.order)
        argv = [sys.executable, "-m", "upstream_demo", "--port", str(self.order_port)]
        self._start(PRODUCER, argv, env)
        await shop.wait_healthy(STARTUP)
        self._event(f"order service ready at {self.order_url}")

    async def _start_consumers(self, plan: Plan) -> None:
        o = self.o
        for group in o.groups:
            env = consumer_env(
                o,
                group,
                service_url=self.service_url,
                token=self.tokens.groups[group],
                state_dir=self.state,
                crashes=plan.consumer_crashes[group],
            )
            self._start(group, [sys.executable, "-m", "downstream_demo", group], env)

        async def consuming() -> bool:
            states = await rabbit.queue_states(o.amqp_url, o.names, o.groups)
            return all(s.consumers > 0 for s in states.values())

        await until(consuming, STARTUP, "the consumers did not start consuming")
        self._event(f"consumers {', '.join(o.groups)} consuming")

    async def _create_orders(self, shop: Shop) -> list[int]:
        limit = asyncio.Semaphore(self.o.concurrency)
        with self._progress() as progress:
            task = progress.add_task("creating orders", total=self.o.messages)

            async def create(i: int) -> int:
                async with limit:
                    order_id = await shop.create(
                        i, books.sku(i), books.QTY, books.PRICE * books.QTY
                    )
                progress.advance(task)
                return order_id

            return list(await asyncio.gather(*(create(i) for i in range(1, self.o.messages + 1))))

    def _announce(self, plan: Plan) -> None:
        self._event(
            f"{len(plan.local_failures)} payments fail locally; the order service is killed"
            f" after commit for orders {_ids(plan.upstream_crashes)}"
        )
        for group, ids in plan.consumer_crashes.items():
            self._event(f"{group} is killed after its effect for orders {_ids(ids)}")
        labels = ", ".join(f"{f.label}@{f.at}" for f in plan.faults)
        self._event(f"environment faults (kind@payment): {labels}")

    def _planned_kills(self, plan: Plan) -> dict[str, int]:
        assert self._injector is not None
        kills = {f"service-{i}": 0 for i in range(INSTANCES)}
        kills |= {c.name: 0 for c in self.tcc.children}
        for record, fault in zip(self.records, plan.faults, strict=False):
            killing = fault.kind in (Kind.KILL_INSTANCE, Kind.KILL_PARTICIPANT)
            if record.ok and killing and "SIGKILL" in record.outcome:
                kills[self._injector.victim(fault).name] += 1
        kills[PRODUCER] = len(plan.upstream_crashes)
        for group, ids in plan.consumer_crashes.items():
            kills[group] = len(ids)
        return kills

    # -- paying under faults -------------------------------------------------------------

    async def _pay(self, shop: Shop, ids: Sequence[int], plan: Plan) -> None:
        """Pay every order with ``concurrency`` payments in flight; inject each fault at
        its moment, in the background, once the fault before it is over."""
        limit = asyncio.Semaphore(self.o.concurrency)
        pending = deque(plan.faults)
        fault: asyncio.Task[None] | None = None
        payments: list[asyncio.Task[None]] = []
        with self._progress() as progress:
            task = progress.add_task("paying orders under faults", total=len(ids))

            async def pay(order_id: int) -> None:
                try:
                    await pay_one(shop, order_id, plan.query(order_id), self._event)
                finally:
                    limit.release()
                    progress.advance(task)

            try:
                for n, order_id in enumerate(ids):
                    while pending and pending[0].at <= n:
                        if fault is not None:
                            await fault
                        fault = asyncio.create_task(self._inject(pending.popleft(), n))
                    await limit.acquire()
                    payments.append(asyncio.create_task(pay(order_id)))
                    self.tcc.paying(n + 1)
                await asyncio.gather(*payments)
                if fault is not None:
                    await fault
            finally:
                for t in [*payments, *([fault] if fault else [])]:
                    t.cancel()
                await asyncio.gather(*payments, *([fault] if fault else []), return_exceptions=True)

    async def _inject(self, fault: Fault, payment: int) -> None:
        assert self._injector is not None
        started = self._now()
        self._event(f"[bold]fault[/] {fault.label} after payment {payment}")
        try:
            outcome = await self._injector.inject(fault)
            ok = True
        except (DemoError, OSError, asyncpg.PostgresError) as exc:
            outcome, ok = f"failed: {exc}", False
        self.records.append(FaultRecord(fault.label, payment, started, self._now(), outcome, ok))
        self._event(f"{'' if ok else '[red]'}fault {fault.label}: {outcome}")

    # -- reporting -----------------------------------------------------------------------

    def _report(self, report: Report) -> None:
        if any(not r.ok for r in self.records):
            report.notes.append("some faults could not be injected: see the faults table")
        report.render(self.console)
        run_dir = self.o.run_dir
        (run_dir / "report.json").write_text(json.dumps(report.as_json(), indent=2) + "\n")
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

    def _now(self) -> float:
        return time.monotonic() - self.started

    def _event(self, text: str) -> None:
        self.console.print(f"[dim]{self._now():7.1f} s[/] {text}", highlight=False)

    def _start(self, name: str, argv: list[str], env: dict[str, str], *, tier: int = 1) -> None:
        log = self.logs / f"{name}.log"
        child = Child(name, argv, env, log, max_restarts=SPARE_RESTARTS, tier=tier)
        self.supervisor.start(child)

    def _reliable_msg(self, *command: str) -> list[str]:
        return [sys.executable, "-m", "reliable_msg", "--config", str(self.o.config), *command]

    def _service_env(self, instance: int) -> dict[str, str]:
        o = self.o
        check_url = f"{self.order_url}/rmsg/check-back"
        return {
            **base_env(),
            "RMSG_DATABASE_URL": o.service_database_url,
            "RMSG_AMQP_URL": self._proxied_amqp_url(),
            "RMSG_PORT": str(self.instance_ports[instance]),
            "RMSG_REDIS_URL": o.redis_url,
            "RMSG_EXCHANGE": o.names.exchange,
            "RMSG_DEAD_LETTER_EXCHANGE": o.names.dead_letter_exchange,
            "RMSG_QUEUE_PREFIX": o.names.queue_prefix,
            "RMSG_FALLBACK__NAMESPACE": o.names.namespace,
            "RMSG_LOG_LEVEL": "info",
            "RMSG_ADMIN_TOKEN": self.tokens.admin,
            f"RMSG_PRODUCERS__{PRODUCER.upper()}__TOKEN": self.tokens.order,
            f"RMSG_PRODUCERS__{PRODUCER.upper()}__CHECK_URL": check_url,
            **{f"RMSG_GROUPS__{g.upper()}__TOKEN": t for g, t in self.tokens.groups.items()},
            **self.tcc.service_env(),
        }

    def _proxied_amqp_url(self) -> str:
        """``amqp_url`` with the fault proxy's address instead of RabbitMQ's."""
        parts = urlsplit(self.o.amqp_url)
        userinfo = parts.netloc.rpartition("@")[0]
        at = f"{userinfo}@" if userinfo else ""
        return parts._replace(netloc=f"{at}127.0.0.1:{self.rabbit_proxy.port}").geturl()


def _db_name(dsn: str) -> str:
    return urlsplit(dsn).path.lstrip("/")


def _ids(ids: frozenset[int]) -> str:
    return ", ".join(map(str, sorted(ids))) or "none"
