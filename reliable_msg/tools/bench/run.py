"""``reliable-msg bench``: every target figure in one run, as a table and as JSON."""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from reliable_msg.tools.bench import ceilings, e2e, floor, scan, tcc
from reliable_msg.tools.bench.report import LATENCY_RUNS, figures_of, summary_table, targets_of

#: The runs of the paths part, in the order they run.
PATHS = ("single", "batch", "latency", "degraded")
#: The parts, in the order they run.
PARTS = ("floor", "ceilings", "scanner", "paths", "tcc")
#: Requests in flight of the floor's client.
FLOOR_IN_FLIGHT = 32


@dataclass(frozen=True)
class Options:
    postgres_url: str = "postgresql://postgres@127.0.0.1:5432"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    redis_url: str = "redis://127.0.0.1:6379/0"
    messages: int = 5000
    batch_messages: int = 20000
    batch: int = 100
    concurrency: int = 32
    small_rows: int = 10_000
    big_rows: int = 5_000_000
    #: TCC global transactions (of three branches each), and how many at once.
    tcc_transactions: int = 3000
    tcc_concurrency: int = 32
    #: Requests of the floor's bare round trips (after a warm-up of a tenth of them).
    floor_requests: int = 20000
    run_dir: Path = Path(".artifacts/bench")
    #: Parts to run: floor, ceilings, scanner, paths, tcc (a partial run prints what it
    #: measured and judges the targets it has the figures of).
    parts: tuple[str, ...] = PARTS
    #: Runs of the paths part: single, batch, latency (needs single), degraded.
    paths: tuple[str, ...] = PATHS


async def run(options: Options, console: Console) -> dict[str, Any]:
    options.run_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": _machine(), "options": _jsonable(options)}
    with Progress(
        TextColumn("{task.description:<34}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        if "floor" in options.parts:
            results["floor"] = await _floor(options, progress)
        if "ceilings" in options.parts:
            results["ceilings"] = await _ceilings(options, progress)
        if "scanner" in options.parts:
            results["scanner"] = await _scanner(options, progress)
        if "paths" in options.parts:
            results["paths"] = await _paths(options, progress)
        if "tcc" in options.parts:
            results["tcc"] = await _tcc(options, progress)
    figures = figures_of(results)
    results["figures"] = figures
    results["targets"] = targets_of(figures)
    console.print(summary_table(results))
    return results


async def _floor(options: Options, progress: Progress) -> dict[str, Any]:
    task = progress.add_task("floor: bare HTTP round trips", total=1)
    measured = await floor.measure(
        requests=options.floor_requests,
        warm_up=max(1, options.floor_requests // 10),
        in_flight=FLOOR_IN_FLIGHT,
    )
    progress.advance(task)
    return measured.summary()


async def _ceilings(options: Options, progress: Progress) -> dict[str, float]:
    task = progress.add_task("ceilings: PostgreSQL, RabbitMQ", total=3)
    dsn = f"{options.postgres_url}/rmsg_bench_app"
    await e2e.app_database(dsn)  # creates the database
    pg = await ceilings.postgres_ceiling(dsn, options.messages, connections=8)
    progress.advance(task)
    publish, consume = await ceilings.rabbit_ceilings(
        options.amqp_url, options.messages * 2, in_flight=256, queue_type="quorum"
    )
    progress.advance(task, 2)
    return {
        "postgres_insert_update_update_msgs_per_s": round(pg, 1),
        "rabbitmq_publish_confirm_msgs_per_s": round(publish, 1),
        "rabbitmq_consume_ack_msgs_per_s": round(consume, 1),
    }


async def _scanner(options: Options, progress: Progress) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, rows in (("small", options.small_rows), ("big", options.big_rows)):
        task = progress.add_task(f"scanner table: {rows:,} finished", total=rows)
        dsn = f"{options.postgres_url}/rmsg_bench_scan_{label}"
        await scan.table_with(dsn, rows, functools.partial(progress.advance, task))
        progress.update(task, completed=rows)
        out[label] = {"finished_rows": rows, "pass_ms": round(await scan.pass_cost(dsn), 3)}
    return out


async def _paths(options: Options, progress: Progress) -> dict[str, Any]:
    app_db = f"{options.postgres_url}/rmsg_bench_app"
    pool = await e2e.app_database(app_db)
    out: dict[str, Any] = {}
    try:
        async with e2e.service(
            options.run_dir,
            f"{options.postgres_url}/rmsg_bench",
            options.amqp_url,
            options.redis_url,
        ) as svc:
            path = functools.partial(_path, progress, svc, pool, app_db, options.run_dir)
            runs = options.paths
            if "single" in runs:
                out["single"] = await path(
                    "single-message API", options.messages, options.concurrency
                )
            if "batch" in runs:
                out["batch"] = await path(
                    "batch API", options.batch_messages, 8, batch=options.batch
                )
            if "latency" in runs and "single" in out:
                rate = out["single"]["msgs_per_s"] / 2
                count = max(500, min(options.messages, int(rate * 10)))
                out["latency"] = [
                    await path(
                        f"latency {n}/{LATENCY_RUNS} at {rate:.0f} msgs/s",
                        count,
                        options.concurrency,
                        rate=rate,
                    )
                    for n in range(1, LATENCY_RUNS + 1)
                ]
            if "degraded" in runs:
                await e2e.degrade(svc, on=True)
                try:
                    out["degraded"] = await path(
                        "single API, degraded to Redis", options.messages, options.concurrency
                    )
                finally:
                    await e2e.degrade(svc, on=False)
    finally:
        await pool.close()
    return out


async def _tcc(options: Options, progress: Progress) -> dict[str, Any]:
    n = options.tcc_transactions
    task = progress.add_task(f"TCC: {n:,} global transactions", total=n)
    databases = tcc.Databases(
        f"{options.postgres_url}/rmsg_bench_tcc", f"{options.postgres_url}/rmsg_bench_parties"
    )
    result = await tcc.run_tcc(
        options.run_dir / "tcc",
        databases,
        options.amqp_url,
        options.redis_url,
        transactions=n,
        concurrency=options.tcc_concurrency,
        tick=lambda k: progress.advance(task, k),
    )
    return result.summary()


async def _path(
    progress: Progress,
    svc: e2e.Service,
    pool: Any,
    app_db: str,
    run_dir: Path,
    label: str,
    messages: int,
    concurrency: int,
    *,
    batch: int = 1,
    rate: float | None = None,
) -> dict[str, Any]:
    task = progress.add_task(label, total=messages)
    result = await e2e.run_path(
        svc,
        pool,
        app_db,
        run_dir,
        messages=messages,
        concurrency=concurrency,
        batch=batch,
        rate=rate,
        tick=lambda n: progress.advance(task, n),
    )
    return result.summary()


def _machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _jsonable(options: Options) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(options).items()}


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=True))
