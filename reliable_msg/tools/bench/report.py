"""What ``reliable-msg bench`` makes of its measurements: the figures the targets judge
(each CPU figure also in multiples of the floor F), the targets met or not, and the
table printed at the end of a run."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from rich.table import Table

from reliable_msg.tools.bench import tcc

#: Latency runs, back to back: the target holds only if it holds in each.
LATENCY_RUNS = 3

#: The targets (DESIGN §9, issue 15): figure, comparison, bound. CPU per message is
#: summed over the service, producers, consumer, PostgreSQL and RabbitMQ, in multiples of
#: the same run's floor F (one bare HTTP round trip: two per message are 2 F).
TARGETS = [
    ("single-message API, CPU per message in F", "single_cpu_floor_multiple", "<=", 7.0),
    ("single-message API, msgs/s", "single_msgs_per_s", ">=", 500.0),
    ("batch API, CPU per message in F", "batch_cpu_floor_multiple", "<=", 2.0),
    ("batch API, msgs/s", "batch_msgs_per_s", ">=", 2500.0),
    (
        f"p99 confirm -> handler at half peak, ms, worst of {LATENCY_RUNS} runs",
        "latency_p99_ms",
        "<",
        50.0,
    ),
    ("scanner pass, big / small table", "scan_ratio", "<=", 2.0),
    ("degraded / normal throughput", "degraded_ratio", ">=", 0.5),
    ("TCC global transactions/s, 3 branches", "tcc_tx_per_s", ">=", 150.0),
]
#: The groups of processes a message's CPU figure sums (``machine`` has other work in
#: it); and a TCC transaction's.
MESSAGE_GROUPS = ("service", "producers", "consumer", "postgres", "rabbitmq")
TX_GROUPS = ("service", "participants", "initiator", "postgres")


def figures_of(results: dict[str, Any]) -> dict[str, Any]:
    """The figures the targets judge, from what the run measured (a part not run leaves
    its figures out; a multiple of F needs the floor part)."""
    f: dict[str, Any] = {}
    floor_ms: float | None = results.get("floor", {}).get("ms_per_request")
    if floor_ms:
        f["floor_ms_per_request"] = floor_ms
    multiples: dict[str, dict[str, float | None]] = {}
    c, p = results.get("ceilings"), results.get("paths", {})
    for name in ("single", "batch", "degraded"):
        if name not in p:
            continue
        path = p[name]
        per = path["cpu_ms_per_msg"]
        total = cpu_total(per, MESSAGE_GROUPS)
        f[f"{name}_msgs_per_s"] = path["msgs_per_s"]
        f[f"{name}_cpu_ms_per_msg_total"] = total
        f[f"{name}_cpu_floor_multiple"] = None if total is None else floor_multiple(total, floor_ms)
        f[f"cpu_ms_per_msg_{name}"] = per
        f[f"service_cpu_s_per_1000_{name}"] = path["service_cpu_s_per_1000"]
        f[f"machine_busy_{name}"] = path["machine_busy"]
        multiples[name] = {g: floor_multiple(ms, floor_ms) for g, ms in per.items()}
        if c is not None and name != "degraded":
            rate = path["msgs_per_s"]
            f[f"{name}_vs_postgres"] = round(
                rate / c["postgres_insert_update_update_msgs_per_s"], 3
            )
            f[f"{name}_vs_publish"] = round(rate / c["rabbitmq_publish_confirm_msgs_per_s"], 3)
            f[f"{name}_vs_consume"] = round(rate / c["rabbitmq_consume_ack_msgs_per_s"], 3)
    if "single" in p and "degraded" in p:
        f["degraded_ratio"] = round(p["degraded"]["msgs_per_s"] / p["single"]["msgs_per_s"], 3)
    if "latency" in p:
        f.update(_latency_figures(p["latency"]))
    if "scanner" in results:
        s = results["scanner"]
        f["scan_small_ms"] = s["small"]["pass_ms"]
        f["scan_big_ms"] = s["big"]["pass_ms"]
        f["scan_ratio"] = round(s["big"]["pass_ms"] / s["small"]["pass_ms"], 3)
    if "tcc" in results:
        t = results["tcc"]
        total = cpu_total(t["cpu_ms_per_tx"], TX_GROUPS)
        f["tcc_tx_per_s"] = t["tx_per_s"]
        f["tcc_p50_ms"] = t["p50_ms"]
        f["tcc_p99_ms"] = t["p99_ms"]
        f["tcc_cpu_ms_per_tx_total"] = total
        f["tcc_cpu_floor_multiple"] = None if total is None else floor_multiple(total, floor_ms)
        multiples["tcc"] = {g: floor_multiple(ms, floor_ms) for g, ms in t["cpu_ms_per_tx"].items()}
    if multiples:
        f["cpu_floor_multiples"] = multiples
    return f


def cpu_total(per: dict[str, float], groups: Sequence[str]) -> float | None:
    """The CPU of ``groups`` summed; None (not measured) if the run watched no process of
    one of them: a group missing is no 0 ms."""
    if any(g not in per for g in groups):
        return None
    return round(sum(per[g] for g in groups), 3)


def missing_groups(per: dict[str, float], groups: Sequence[str]) -> str:
    """The table's note for a sum :func:`cpu_total` could not make."""
    missing = [g for g in groups if g not in per]
    return f"not measured: no {', no '.join(missing)} process watched" if missing else ""


def floor_multiple(ms: float, floor_ms: float | None) -> float | None:
    """``ms`` in multiples of the floor F (None without a floor)."""
    return round(ms / floor_ms, 2) if floor_ms else None


def in_floor(ms: float | None, floor_ms: float | None) -> str:
    """``ms`` as the table prints a CPU figure: ``7.90 ms = 14.4 F``."""
    if ms is None or ms != ms:
        return "nan"
    if not floor_ms:
        return f"{ms:.2f} ms"
    return f"{ms:.2f} ms = {ms / floor_ms:.1f} F"


def _latency_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each latency run's spread; the headline figures are those of the run with the
    highest p99, and its p99 is NaN unless all :data:`LATENCY_RUNS` runs measured one
    (the target holds only if it holds in each)."""
    nan = float("nan")
    each = [
        {
            "msgs_per_s": r["msgs_per_s"],
            "p50_ms": r.get("p50_ms", nan),
            "p99_ms": r.get("p99_ms", nan),
            "max_ms": r.get("max_ms", nan),
            "machine_busy": r["machine_busy"],
        }
        for r in runs
    ]
    measured = [r for r in runs if "p99_ms" in r]
    worst = max(measured, key=lambda r: r["p99_ms"], default={})
    complete = len(measured) == LATENCY_RUNS
    return {
        "latency_runs": each,
        "latency_p50_ms": worst.get("p50_ms", nan),
        "latency_p99_ms": worst.get("p99_ms", nan) if complete else nan,
        "latency_max_ms": max((r["max_ms"] for r in measured), default=nan),
        "latency_phases_p99_ms": {
            name: spread["p99_ms"] for name, spread in worst.get("phases_ms", {}).items()
        },
        "machine_busy_latency": worst.get("machine_busy"),
    }


def targets_of(figures: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "target": name,
            "key": key,
            "value": figures.get(key),
            "bound": f"{op} {bound:g}" + (" F" if key.endswith("_floor_multiple") else ""),
            "met": _met(figures.get(key), op, bound),
        }
        for name, key, op, bound in TARGETS
    ]


def _met(value: float | None, op: str, bound: float) -> bool | None:
    if value is None or value != value:  # NaN: not measured
        return None
    return {">=": value >= bound, "<": value < bound, "<=": value <= bound}[op]


def summary_table(results: dict[str, Any]) -> Table:
    f = results["figures"]
    table = Table(title="reliable-msg benchmark", show_lines=False)
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("ratio / target")
    rows: list[tuple[str, Any, str]] = []
    if "floor" in results:
        rows.append(_floor_row(results["floor"]))
    if "ceilings" in results:
        c = results["ceilings"]
        rows += [
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
            (
                "ceiling: RabbitMQ consume with ack, msgs/s",
                c["rabbitmq_consume_ack_msgs_per_s"],
                "",
            ),
        ]
    rows += _path_rows(f)
    rows += _cpu_rows(f)
    if "tcc" in results:
        rows += _tcc_rows(results["tcc"], f.get("floor_ms_per_request"))
    for name, value, note in rows:
        table.add_row(name, str(value), note)
    for target in results["targets"]:
        mark = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
        table.add_row(
            f"target: {target['target']}", _target_value(target, f), f"{target['bound']}: {mark}"
        )
    return table


def _target_value(target: dict[str, Any], f: dict[str, Any]) -> str:
    """A target's figure; a multiple of F with the milliseconds it is."""
    value, key = target["value"], target["key"]
    if value is None:
        return ""
    ms = f.get(key.replace("_cpu_floor_multiple", "_cpu_ms_per_msg_total"))
    floor_ms = f.get("floor_ms_per_request")
    if key.endswith("_cpu_floor_multiple") and ms is not None and floor_ms:
        return f"{ms / floor_ms:.1f} F = {ms:.2f} ms"  # as :func:`in_floor` prints it
    return str(value)


def _path_rows(f: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """Throughput, latency, the scanner pass and the degraded run, as measured."""
    rows: list[tuple[str, Any, str]] = []
    throughput = {"single": "target >= 500", "batch": "target >= 2500"}
    for name, label in (("single", "single-message API"), ("batch", "batch API")):
        if f"{name}_msgs_per_s" in f:
            note = (
                f"{f[name + '_vs_postgres']:.2f} of PG, {f[name + '_vs_publish']:.2f} of "
                f"publish, {f[name + '_vs_consume']:.2f} of consume; "
                if f"{name}_vs_postgres" in f
                else ""
            ) + throughput[name]
            rows.append((f"end to end, {label}, msgs/s", f[f"{name}_msgs_per_s"], note))
    if "latency_runs" in f:
        rows += _latency_rows(f)
    if "scan_ratio" in f:
        rows.append(
            (
                "scanner pass, 10k / 5M finished rows, ms",
                f"{f['scan_small_ms']} / {f['scan_big_ms']}",
                f"ratio {f['scan_ratio']}",
            )
        )
    if "degraded_msgs_per_s" in f:
        ratio = f.get("degraded_ratio")
        rows.append(
            (
                "degraded to Redis, msgs/s",
                f["degraded_msgs_per_s"],
                f"{ratio:.2f} of normal" if ratio is not None else "",
            )
        )
    return rows


def _floor_row(floor_summary: dict[str, Any]) -> tuple[str, Any, str]:
    cpu = floor_summary["cpu_ms_per_request"]
    busy = floor_summary.get("machine_busy")
    return (
        "floor F: CPU ms of one bare HTTP round trip",
        f"{floor_summary['ms_per_request']:.3f}",
        f"client {cpu.get('client', float('nan')):.3f} + server "
        f"{cpu.get('server', float('nan')):.3f}; FastAPI + pydantic under uvicorn, "
        f"aiohttp, {floor_summary['requests']:,} requests, {floor_summary['in_flight']} "
        f"in flight, {floor_summary['requests_per_s']:,.0f}/s"
        + (f", machine {busy:.0%} busy" if busy is not None else ""),
    )


def _latency_rows(f: dict[str, Any]) -> list[tuple[str, Any, str]]:
    rows: list[tuple[str, Any, str]] = []
    runs = f["latency_runs"]
    for n, r in enumerate(runs, 1):
        busy = r["machine_busy"]
        rows.append(
            (
                f"confirm -> handler p50 / p99 / max, ms, run {n} of {len(runs)}",
                f"{r['p50_ms']} / {r['p99_ms']} / {r['max_ms']}",
                f"at {r['msgs_per_s']} msgs/s (half the single-API peak)"
                + (f", machine {busy:.0%} busy" if busy is not None else ""),
            )
        )
    rows.append(
        (
            "  of which p99 (run of the highest p99): confirm call / to arrival / "
            "arrival -> handler, ms",
            " / ".join(
                str(f["latency_phases_p99_ms"].get(name, float("nan")))
                for name in ("confirm_call", "confirm_to_arrival", "arrival_to_handler")
            ),
            "confirm call: the producer's HTTP call, answered after the publish is confirmed",
        )
    )
    return rows


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
    """CPU per message: summed and per group, in ms and in F, of each run measured."""
    floor_ms = f.get("floor_ms_per_request")
    runs = [r for r in ("single", "batch", "degraded") if f"{r}_cpu_ms_per_msg_total" in f]
    rows: list[tuple[str, Any, str]] = []
    bounds = {"single": "target <= 7 F", "batch": "target <= 2 F"}
    for run in runs:
        missing = missing_groups(f[f"cpu_ms_per_msg_{run}"], MESSAGE_GROUPS)
        notes = (missing, "" if floor_ms else "no floor", bounds.get(run, ""))
        note = "; ".join(n for n in notes if n)
        rows.append(
            (
                f"CPU per message, {run}: service + producers + consumer + PG + RabbitMQ",
                in_floor(f[f"{run}_cpu_ms_per_msg_total"], floor_ms),
                note,
            )
        )
    shown = [r for r in runs if r != "degraded"]  # per group: in the JSON only
    if not shown:
        return rows
    for group, name in CPU_NAMES.items():
        note = ""
        if group == "machine":
            busy = " / ".join(f"{f[f'machine_busy_{r}'] or float('nan'):.0%}" for r in shown)
            note = f"busy {busy} of {os.cpu_count()} cores, other work on the machine included"
        rows.append(
            (
                f"CPU per message {' / '.join(shown)}: {name}",
                " / ".join(
                    in_floor(f[f"cpu_ms_per_msg_{r}"].get(group, float("nan")), floor_ms)
                    for r in shown
                ),
                note,
            )
        )
    return rows


def _tcc_rows(t: dict[str, Any], floor_ms: float | None = None) -> list[tuple[str, Any, str]]:
    phases = t["phases_ms"]
    total = cpu_total(t["cpu_ms_per_tx"], TX_GROUPS)
    rows: list[tuple[str, Any, str]] = [
        (
            "TCC, 3 branches: global transactions/s",
            t["tx_per_s"],
            f"{t['transactions']:,} transactions, each a begin, 3 Trys, a commit and 3 "
            "Confirms at participant processes with barrier and account",
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
        (
            "TCC CPU per transaction: service + participants + initiator + PG",
            in_floor(total, floor_ms),
            missing_groups(t["cpu_ms_per_tx"], TX_GROUPS)
            or ("" if floor_ms else "no floor measured"),
        ),
    ]
    for group, name in tcc.CPU_GROUPS.items():
        ms = t["cpu_ms_per_tx"].get(group, float("nan"))
        rows.append((f"TCC CPU per transaction: {name}", in_floor(ms, floor_ms), ""))
    return rows


def tcc_table(t: dict[str, Any], floor_ms: float | None = None) -> Table:
    table = Table(title="reliable-msg benchmark: TCC")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("note")
    for name, value, note in _tcc_rows(t, floor_ms):
        table.add_row(name, str(value), note)
    return table
