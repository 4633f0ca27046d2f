"""The full path: a real service process, the producer and consumer SDKs in this one."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg

from reliable_msg.harness.config import write_config
from reliable_msg.harness.ports import free_port
from reliable_msg.harness.process import Process, serve_argv, stop, stop_gracefully, wait_ready
from reliable_msg.sdk import consumer as consumer_sdk
from reliable_msg.sdk import producer as producer_sdk
from reliable_msg.sdk.client import RetryPolicy
from reliable_msg.service.migrate import migrate
from reliable_msg.tools.bench.cpu import CpuWatch
from reliable_msg.transports.redis_client import redis_client
from reliable_msg.transports.switch import Switch

TOPIC = "bench.paid"
GROUP = "bench"
NAMES = "rmsgbench"
RETRY = RetryPolicy(attempts=10, initial=0.05, max_wait=1.0, deadline=60.0)
#: Seconds the service gets to become ready; seconds a process gets to stop after SIGTERM.
STARTUP = 30.0
GRACE = 15.0


@dataclass
class Service:
    url: str
    pid: int
    producer_token: str
    group_token: str
    admin_token: str
    amqp_url: str
    redis_url: str
    database_url: str


def _config(
    port: int,
    service_db: str,
    amqp_url: str,
    redis_url: str,
    names: str = NAMES,
    participants: dict[str, dict[str, str]] | None = None,
) -> dict[str, Any]:
    return {
        "database_url": service_db,
        "amqp_url": amqp_url,
        "redis_url": redis_url,
        "port": port,
        "exchange": names,
        "dead_letter_exchange": f"{names}.dlx",
        "queue_prefix": f"{names}.",
        "db_pool_size": 20,
        "max_batch": 1000,
        "checkback": {"after": 600.0},
        "redelivery": {"ack_timeout": 600.0},
        "fallback": {
            "namespace": names,
            "shards": 32,
            "failure_threshold": 10,
            "probe_interval": 3600.0,
        },
        "producers": {"bench": {"check_url": "http://127.0.0.1:9/check-back"}},
        "groups": {GROUP: {"topics": [TOPIC]}},
        "participants": participants or {},
    }


@asynccontextmanager
async def service(
    run_dir: Path,
    service_db: str,
    amqp_url: str,
    redis_url: str,
    *,
    names: str = NAMES,
    participants: dict[str, dict[str, str]] | None = None,
) -> AsyncIterator[Service]:
    """A fresh database and a ``reliable-msg serve`` process over it, its exchange,
    queues and Redis keys named after ``names``, calling ``participants`` (their
    ``[participants.<name>]`` tables) for TCC."""
    await _drop(service_db)
    await migrate(service_db)
    await _drop_queues(amqp_url, names)
    port = free_port()
    data = _config(port, service_db, amqp_url, redis_url, names, participants)
    config = write_config(run_dir / "bench.toml", data)
    tokens = {k: secrets.token_hex(16) for k in ("producer", "group", "admin")}
    env = {
        **os.environ,
        "RMSG_PRODUCERS__BENCH__TOKEN": tokens["producer"],
        f"RMSG_GROUPS__{GROUP.upper()}__TOKEN": tokens["group"],
        "RMSG_ADMIN_TOKEN": tokens["admin"],
        "RMSG_LOG_LEVEL": "warning",
    }
    log = run_dir / "service.log"
    log.unlink(missing_ok=True)  # this service's log only, not the previous runs' too
    process = Process("service", serve_argv(config), env, log)
    process.start()
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url, process, within=STARTUP)
        yield Service(
            url,
            process.pid,
            tokens["producer"],
            tokens["group"],
            tokens["admin"],
            amqp_url,
            redis_url,
            service_db,
        )
    finally:
        await asyncio.to_thread(stop, [process], GRACE)


async def _drop_queues(amqp_url: str, names: str = NAMES) -> None:
    """Start from empty queues (and let a changed queue type take effect)."""
    connection = await aio_pika.connect(amqp_url)
    try:
        for queue in (f"{names}.{GROUP}", f"{names}.{GROUP}.dlq", f"{names}._probe"):
            async with connection.channel() as channel:
                await channel.queue_delete(queue)
    finally:
        await connection.close()


async def _drop(dsn: str) -> None:
    base, name = dsn.rsplit("/", 1)
    admin = await asyncpg.connect(f"{base}/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def app_database(dsn: str) -> asyncpg.Pool:
    """The producer's and consumer's own database: marker, inbox, business tables."""
    base, name = dsn.rsplit("/", 1)
    admin = await asyncpg.connect(f"{base}/postgres")
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await producer_sdk.install(conn)
        await consumer_sdk.install(conn)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_orders (id text PRIMARY KEY, at timestamptz);"
            "CREATE TABLE IF NOT EXISTS bench_effects (id text PRIMARY KEY);"
        )
    return pool


async def reset_app(pool: asyncpg.Pool) -> None:
    await pool.execute("TRUNCATE bench_orders, bench_effects, rmsg_inbox, rmsg_producer_marker")


#: The groups of processes whose CPU a run reports per message; ``machine`` is every
#: process of the machine (other work on it included).
CPU_GROUPS = ("service", "producers", "consumer", "postgres", "rabbitmq", "machine")


@dataclass
class Run:
    messages: int
    elapsed: float
    rate: float
    #: CPU seconds per group of processes over the run (see :mod:`.cpu`).
    cpu: dict[str, float] = field(default_factory=dict)
    #: Milliseconds per message of each of :data:`PHASES`.
    phases: dict[str, list[float]] = field(default_factory=dict)

    @property
    def latencies_ms(self) -> list[float]:
        return self.phases.get("confirm_to_handler", [])

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "messages": self.messages,
            "seconds": round(self.elapsed, 3),
            "msgs_per_s": round(self.rate, 1),
            "service_cpu_s_per_1000": round(self.cpu.get("service", 0.0) / self.messages * 1000, 3),
            "cpu_ms_per_msg": {
                group: round(seconds / self.messages * 1000, 3)
                for group, seconds in self.cpu.items()
                if group in CPU_GROUPS
            },
            "machine_busy": round(self.cpu["machine"] / self.cpu["capacity"], 3)
            if self.cpu.get("capacity")
            else None,
        }
        if self.latencies_ms:
            out.update(_spread(self.latencies_ms))
            out["phases_ms"] = {name: _spread(ms) for name, ms in self.phases.items() if ms}
        return out


def _spread(ms: list[float]) -> dict[str, float]:
    ordered = sorted(ms)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {
        "p50_ms": round(statistics.median(ordered), 2),
        "p99_ms": round(p99, 2),
        "max_ms": round(ordered[-1], 2),
    }


async def run_path(
    svc: Service,
    pool: asyncpg.Pool,
    app_db: str,
    run_dir: Path,
    *,
    messages: int,
    concurrency: int,
    producers: int = 2,
    batch: int = 1,
    rate: float | None = None,
    tick: Callable[[int], None] = lambda _: None,
) -> Run:
    """Produce ``messages`` (in batches of ``batch``) from ``producers`` processes through
    the producer SDK, consume them in a consumer process with the consumer SDK, and time
    the whole from the first prepare to the last ack recorded by the service."""
    await reset_app(pool)
    baseline = await _done_count(svc)
    common = {"url": svc.url, "app_db": app_db, "topic": TOPIC}
    consumer_out = run_dir / "handled.json"
    consumer = await _worker(
        "consume",
        {
            **common,
            "token": svc.group_token,
            "group": GROUP,
            "amqp_url": svc.amqp_url,
            "redis_url": svc.redis_url,
            "queue": f"{NAMES}.{GROUP}",
            "namespace": NAMES,
            "shards": 32,
            "out": str(consumer_out),
        },
        stdout=True,
    )
    progress = asyncio.create_task(_follow(consumer, tick))
    start_at = time.time() + 1.5  # every process up and connected by then
    shares = _shares(messages, producers, batch)
    outs = [run_dir / f"sent-{i}.json" for i in range(len(shares))]
    admin_dsn = f"{app_db.rsplit('/', 1)[0]}/postgres"
    databases = [svc.database_url.rsplit("/", 1)[1], app_db.rsplit("/", 1)[1]]
    watch = CpuWatch(admin_dsn, databases)
    watching: asyncio.Task[None] | None = None
    procs = []
    try:
        for share, out in zip(shares, outs, strict=True):
            spec = {
                **common,
                "token": svc.producer_token,
                "messages": share,
                "batch": batch,
                "concurrency": max(1, concurrency // len(shares)),
                "rate": rate / len(shares) if rate else None,
                "start_at": start_at,
                "out": str(out),
            }
            procs.append(await _worker("produce", spec))
        pids = {svc.pid: "service", consumer.pid: "consumer"}
        pids.update({p.pid: "producers" for p in procs})
        watching = asyncio.create_task(_watch_from(start_at, watch, pids))
        for proc in procs:
            if await proc.wait() != 0:
                raise RuntimeError("a producer process failed; see its output above")
        await _wait_done(svc, baseline + messages)
        elapsed = time.time() - start_at
        await watching
        cpu = await watch.stop()
    finally:
        if watching is not None:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
        await watch.close()
        # Also after a failed run: a consumer left behind would take the next run's
        # messages, and its connections.
        await stop_gracefully(consumer, *procs, grace=GRACE)
    await progress
    sent: dict[str, list[float]] = {}
    for out in outs:
        sent.update(json.loads(out.read_text()))
    handled: dict[str, list[float]] = json.loads(consumer_out.read_text())
    return Run(messages, elapsed, messages / elapsed, cpu=cpu, phases=_phases(sent, handled))


#: The parts of confirm -> handler start, from the producer's and the consumer's clocks
#: (one machine, one clock): name, from, to, as indexes into the two processes' times
#: (producer: confirm sent, confirm answered; consumer: arrived, handler started).
PHASES = (
    ("confirm_to_handler", ("sent", 0), ("handled", 1)),
    ("confirm_call", ("sent", 0), ("sent", 1)),
    ("confirm_to_arrival", ("sent", 0), ("handled", 0)),
    ("arrival_to_handler", ("handled", 0), ("handled", 1)),
)


def _phases(
    sent: dict[str, list[float]], handled: dict[str, list[float]]
) -> dict[str, list[float]]:
    """Milliseconds of each of :data:`PHASES` for every message seen at both ends."""
    out: dict[str, list[float]] = {name: [] for name, _, _ in PHASES}
    for id, produced in sent.items():
        consumed = handled.get(id)
        if consumed is None or len(produced) < 2:
            continue
        times = {"sent": produced, "handled": consumed}
        for name, (a, i), (b, j) in PHASES:
            out[name].append((times[b][j] - times[a][i]) * 1000)
    return out


async def _watch_from(start_at: float, watch: CpuWatch, pids: dict[int, str]) -> None:
    """Start counting CPU at ``start_at``: the processes' start-up is not the run's."""
    await asyncio.sleep(max(0.0, start_at - time.time()))
    await watch.start(pids)


def _shares(messages: int, producers: int, batch: int) -> list[int]:
    batches = -(-messages // batch)
    per = [batches // producers + (1 if i < batches % producers else 0) for i in range(producers)]
    shares = [n * batch for n in per if n]
    shares[-1] -= sum(shares) - messages
    return shares


async def _worker(
    command: str, spec: dict[str, Any], *, stdout: bool = False, stdin: bool = False
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "reliable_msg.tools.bench.worker",
        command,
        json.dumps(spec),
        stdout=asyncio.subprocess.PIPE if stdout else None,
        stdin=asyncio.subprocess.PIPE if stdin else None,
    )


async def _follow(proc: asyncio.subprocess.Process, tick: Callable[[int], None]) -> None:
    assert proc.stdout is not None
    last = 0
    async for line in proc.stdout:
        count = int(line.strip() or 0)
        tick(count - last)
        last = count


async def _done_count(svc: Service) -> int:
    conn = await asyncpg.connect(svc.database_url)
    try:
        done: int = await conn.fetchval("SELECT count(*) FROM rmsg_message WHERE status = 'done'")
        return done
    finally:
        await conn.close()


async def _wait_done(svc: Service, messages: int) -> None:
    conn = await asyncpg.connect(svc.database_url)
    try:
        for _ in range(6000):
            done = await conn.fetchval("SELECT count(*) FROM rmsg_message WHERE status = 'done'")
            if done >= messages:
                return
            await asyncio.sleep(0.01)
    finally:
        await conn.close()
    raise RuntimeError("not every message became done within 60 s of the last handler")


async def degrade(svc: Service, on: bool) -> None:
    """Flip the bench deployment's switch, as an outage would."""
    redis = redis_client(svc.redis_url)
    try:
        switch = Switch(redis, who="bench", namespace=NAMES)
        if on:
            await switch.trip("bench: degraded throughput")
        else:
            await switch.clear("bench: done")
    finally:
        await redis.aclose()
