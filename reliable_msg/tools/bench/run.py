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
from rich.table import Table

from reliable_msg.tools.bench import ceilings, e2e, scan, tcc

#: The runs of the paths part, in the order they run.
PATHS = ("single", "batch", "latency", "degraded")
#: The parts, in the order they run.
PARTS = ("ceilings", "scanner", "paths", "tcc")


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
    run_dir: Path = Path(".artifacts/bench")
    #: Parts to run: ceilings, scanner, paths, tcc (a partial run prints what it
    #: measured).
    parts: tuple[str, ...] = PARTS
    #: Runs of the paths part: single, batch, latency (needs single), degraded.
    paths: tuple[str, ...] = PATHS


#: The targets: figure, comparison, bound.
TARGETS = [
    ("single-message API, msgs/s", "single_msgs_per_s", ">=", 1000.0),
    ("batch API, msgs/s", "batch_msgs_per_s", ">=", 5000.0),
    ("p99 confirm -> handler at half peak, ms", "latency_p99_ms", "<", 50.0),
    ("scanner pass, big / small table", "scan_ratio", "<=", 2.0),
    ("degraded / normal throughput", "degraded_ratio", ">=", 0.5),
    ("TCC global transactions/s, 3 branches", "tcc_tx_per_s", ">=", 150.0),
]


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
        if "ceilings" in options.parts:
            results["ceilings"] = await _ceilings(options, progress)
        if "scanner" in options.parts:
            results["scanner"] = await _scanner(options, progress)
        if "paths" in options.parts:
            results["paths"] = await _paths(options, progress)
        if "tcc" in options.parts:
            results["tcc"] = await _tcc(options, progress)
    if set(options.parts) != set(PARTS) or options.paths != PATHS:
        console.print_json(data={k: v for k, v in results.items() if k != "options"})
        if "tcc" in results:
            console.print(_tcc_table(results["tcc"]))
        return results
    figures = _figures(results)
    results["figures"] = figures
    results["targets"] = _targets(figures)
    console.print(_table(results))
    return results


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
                out["latency"] = await path(
                    f"latency at {rate:.0f} msgs/s", count, options.concurrency, rate=rate
                )
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


def _figures(results: dict[str, Any]) -> dict[str, Any]:
    c, p, s = results["ceilings"], results["paths"], results["scanner"]
    single, batch = p["single"]["msgs_per_s"], p["batch"]["msgs_per_s"]
    pg = c["postgres_insert_update_update_msgs_per_s"]
    publish = c["rabbitmq_publish_confirm_msgs_per_s"]
    consume = c["rabbitmq_consume_ack_msgs_per_s"]
    return {
        "single_msgs_per_s": single,
        "batch_msgs_per_s": batch,
        "single_vs_postgres": round(single / pg, 3),
        "single_vs_publish": round(single / publish, 3),
        "single_vs_consume": round(single / consume, 3),
        "batch_vs_postgres": round(batch / pg, 3),
        "batch_vs_publish": round(batch / publish, 3),
        "batch_vs_consume": round(batch / consume, 3),
        "latency_p50_ms": p["latency"].get("p50_ms", float("nan")),
        "latency_p99_ms": p["latency"].get("p99_ms", float("nan")),
        "latency_max_ms": p["latency"].get("max_ms", float("nan")),
        "latency_phases_p99_ms": {
            name: spread["p99_ms"] for name, spread in p["latency"].get("phases_ms", {}).items()
        },
        "machine_busy_latency": p["latency"]["machine_busy"],
        "scan_small_ms": s["small"]["pass_ms"],
        "scan_big_ms": s["big"]["pass_ms"],
        "scan_ratio": round(s["big"]["pass_ms"] / s["small"]["pass_ms"], 3),
        "degraded_msgs_per_s": p["degraded"]["msgs_per_s"],
        "degraded_ratio": round(p["degraded"]["msgs_per_s"] / single, 3),
        "service_cpu_s_per_1000_single": p["single"]["service_cpu_s_per_1000"],
        "service_cpu_s_per_1000_batch": p["batch"]["service_cpu_s_per_1000"],
        "cpu_ms_per_msg_single": p["single"]["cpu_ms_per_msg"],
        "cpu_ms_per_msg_batch": p["batch"]["cpu_ms_per_msg"],
        "machine_busy_single": p["single"]["machine_busy"],
        "machine_busy_batch": p["batch"]["machine_busy"],
        "tcc_tx_per_s": results["tcc"]["tx_per_s"],
        "tcc_p50_ms": results["tcc"]["p50_ms"],
        "tcc_p99_ms": results["tcc"]["p99_ms"],
    }


def _targets(figures: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "target": name,
            "value": figures.get(key),
            "bound": f"{op} {bound}",
            "met": _met(figures.get(key), op, bound),
        }
        for name, key, op, bound in TARGETS
    ]


def _met(value: float | None, op: str, bound: float) -> bool | None:
    if value is None or value != value:  # NaN: not measured
        return None
    return {">=": value >= bound, "<": value < bound, "<=": value <= bound}[op]


def _table(results: dict[str, Any]) -> Table:
    c, f = results["ceilings"], results["figures"]
    table = Table(title="reliable-msg benchmark", show_lines=False)
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("ratio / target")
    rows = [
        (
            "ceiling: PostgreSQL insert+update+update, msgs/s",
            c["postgres_insert_update_update_msgs_per_s"],
            "",
        ),
        (
            "ceiling: RabbitMQ publish with confirm, msgs/s",
            c["rabbitmq_publish_confirm_msgs_per_s"],
            "",
        ),
        ("ceiling: RabbitMQ consume with ack, msgs/s", c["rabbitmq_consume_ack_msgs_per_s"], ""),
        (
            "end to end, single-message API, msgs/s",
            f["single_msgs_per_s"],
            f"{f['single_vs_postgres']:.2f} of PG, {f['single_vs_publish']:.2f} of publish, "
            f"{f['single_vs_consume']:.2f} of consume; target >= 1000",
        ),
        (
            "end to end, batch API, msgs/s",
            f["batch_msgs_per_s"],
            f"{f['batch_vs_postgres']:.2f} of PG, {f['batch_vs_publish']:.2f} of publish, "
            f"{f['batch_vs_consume']:.2f} of consume; target >= 5000",
        ),
        (
            "confirm -> handler p50 / p99 / max, ms",
            f"{f['latency_p50_ms']} / {f['latency_p99_ms']} / {f['latency_max_ms']}",
            f"at half the single-API peak, machine {f['machine_busy_latency']:.0%} busy; "
            "target p99 < 50",
        ),
        (
            "  of which p99: confirm call / to arrival / arrival -> handler, ms",
            " / ".join(
                str(f["latency_phases_p99_ms"].get(name, float("nan")))
                for name in ("confirm_call", "confirm_to_arrival", "arrival_to_handler")
            ),
            "confirm call: the producer's HTTP call, answered after the publish is confirmed",
        ),
        (
            "scanner pass, 10k / 5M finished rows, ms",
            f"{f['scan_small_ms']} / {f['scan_big_ms']}",
            f"ratio {f['scan_ratio']}; target <= 2",
        ),
        (
            "degraded to Redis, msgs/s",
            f["degraded_msgs_per_s"],
            f"{f['degraded_ratio']:.2f} of normal; target >= 0.5",
        ),
    ]
    rows += _cpu_rows(f)
    rows += _tcc_rows(results["tcc"])
    for name, value, note in rows:
        table.add_row(name, str(value), note)
    for target in results["targets"]:
        mark = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
        table.add_row(
            f"target: {target['target']}", str(target["value"]), f"{target['bound']}: {mark}"
        )
    return table


#: The CPU groups of a path run, as the table names them.
CPU_NAMES = {
    "service": "service",
    "producers": "producer processes",
    "consumer": "consumer process",
    "postgres": "PostgreSQL backends",
    "rabbitmq": "RabbitMQ",
    "machine": "whole machine",
}


def _cpu_rows(f: dict[str, Any]) -> list[tuple[str, Any, str]]:
    single, batch = f["cpu_ms_per_msg_single"], f["cpu_ms_per_msg_batch"]
    rows: list[tuple[str, Any, str]] = []
    for group, name in CPU_NAMES.items():
        note = ""
        if group == "machine":
            note = (
                f"busy {f['machine_busy_single']:.0%} / {f['machine_busy_batch']:.0%} of "
                f"{os.cpu_count()} cores, other work on the machine included"
            )
        rows.append((f"CPU ms/msg single / batch: {name}", _pair(group, single, batch), note))
    return rows


def _pair(group: str, single: dict[str, float], batch: dict[str, float]) -> str:
    return f"{single.get(group, float('nan')):.2f} / {batch.get(group, float('nan')):.2f}"


def _tcc_rows(t: dict[str, Any]) -> list[tuple[str, Any, str]]:
    phases = t["phases_ms"]
    rows: list[tuple[str, Any, str]] = [
        (
            "TCC, 3 branches: global transactions/s",
            t["tx_per_s"],
            f"{t['transactions']:,} transactions, each a begin, 3 Trys, a commit and 3 "
            "Confirms at participant processes with barrier and account; target >= 150",
        ),
        (
            "TCC begin -> all confirmed p50 / p99 / max, ms",
            f"{t['p50_ms']} / {t['p99_ms']} / {t['max_ms']}",
            f"machine {t['machine_busy']:.0%} busy",
        ),
        (
            "  of which p99: begin -> commit answered / -> confirmed, ms",
            f"{phases['begin_to_committed']['p99_ms']} / "
            f"{phases['committed_to_confirmed']['p99_ms']}",
            "confirmed: as the coordinator recorded it, every Confirm answered",
        ),
    ]
    for group, name in tcc.CPU_GROUPS.items():
        ms = t["cpu_ms_per_tx"].get(group, float("nan"))
        rows.append((f"TCC CPU ms/tx: {name}", f"{ms:.2f}", ""))
    return rows


def _tcc_table(t: dict[str, Any]) -> Table:
    table = Table(title="reliable-msg benchmark: TCC")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("note")
    for name, value, note in _tcc_rows(t):
        table.add_row(name, str(value), note)
    return table


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
