"""The benchmark's arithmetic: latency phases per message and the figures table."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from reliable_msg.tools.bench import e2e, run


def test_phases_split_confirm_to_handler_at_the_answer_and_the_arrival() -> None:
    sent = {"a": [10.000, 10.004], "b": [10.010, 10.030], "late": [11.0, 11.1]}
    handled = {"a": [10.002, 10.003], "b": [10.020, 10.050], "stranger": [9.0, 9.1]}

    phases = e2e._phases(sent, handled)

    def ms(name: str) -> list[float]:
        return [round(x, 3) for x in phases[name]]

    assert ms("confirm_to_handler") == [3.0, 40.0]
    assert ms("confirm_call") == [4.0, 20.0]
    assert ms("confirm_to_arrival") == [2.0, 10.0]
    assert ms("arrival_to_handler") == [1.0, 30.0]


def test_a_message_whose_confirm_never_answered_is_left_out() -> None:
    assert e2e._phases({"a": [1.0]}, {"a": [1.1, 1.2]})["confirm_to_handler"] == []


def test_spread_takes_the_99th_percentile_of_a_hundred_as_the_largest() -> None:
    spread = e2e._spread([float(x) for x in range(1, 101)])
    assert spread == {"p50_ms": 50.5, "p99_ms": 100.0, "max_ms": 100.0}


def _path(rate: float, *, latency: bool = False) -> dict[str, Any]:
    cpu = {"service": 1.5, "machine": 6.0}
    out: dict[str, Any] = {
        "msgs_per_s": rate,
        "service_cpu_s_per_1000": 1.5,
        "cpu_ms_per_msg": cpu,
        "machine_busy": 0.5,
    }
    if latency:
        out.update(p50_ms=3.0, p99_ms=12.0, max_ms=20.0)
        out["phases_ms"] = {
            "confirm_call": {"p50_ms": 3.3, "p99_ms": 11.5, "max_ms": 43.0},
            "confirm_to_arrival": {"p50_ms": 2.4, "p99_ms": 8.9, "max_ms": 16.0},
            "arrival_to_handler": {"p50_ms": 0.4, "p99_ms": 3.1, "max_ms": 14.0},
        }
    return out


def test_the_table_shows_every_figure_and_judges_every_target() -> None:
    results: dict[str, Any] = {
        "ceilings": {
            "postgres_insert_update_update_msgs_per_s": 4000.0,
            "rabbitmq_publish_confirm_msgs_per_s": 5000.0,
            "rabbitmq_consume_ack_msgs_per_s": 8000.0,
        },
        "scanner": {"small": {"pass_ms": 8.0}, "big": {"pass_ms": 9.0}},
        "paths": {
            "single": _path(280.0),
            "batch": _path(1200.0),
            "latency": _path(140.0, latency=True),
            "degraded": _path(100.0),
        },
        "tcc": {
            "transactions": 3000,
            "tx_per_s": 120.5,
            "p50_ms": 80.0,
            "p99_ms": 210.0,
            "max_ms": 300.0,
            "machine_busy": 0.97,
            "cpu_ms_per_tx": {"service": 4.25, "participants": 3.5, "machine": 15.0},
            "phases_ms": {
                "begin_to_committed": {"p99_ms": 150.0},
                "committed_to_confirmed": {"p99_ms": 70.0},
            },
        },
    }
    figures = run._figures(results)
    results["figures"] = figures
    results["targets"] = run._targets(figures)

    console = Console(width=200, record=True)
    console.print(run._table(results))
    text = console.export_text()

    assert figures["latency_phases_p99_ms"] == {
        "confirm_call": 11.5,
        "confirm_to_arrival": 8.9,
        "arrival_to_handler": 3.1,
    }
    assert "11.5 / 8.9 / 3.1" in text
    assert "3.0 / 12.0 / 20.0" in text
    assert [t["met"] for t in results["targets"]] == [False, False, True, True, False, False]
    assert text.count("NOT met") == 4
    assert "│ 120.5 │" in _row(text, "TCC, 3 branches: global transactions/s")
    assert "│ 80.0 / 210.0 / 300.0 │" in _row(text, "TCC begin -> all confirmed")
    assert "│ 150.0 / 70.0 │" in _row(text, "of which p99: begin -> commit answered")
    assert "│ 4.25 │" in _row(text, "TCC CPU ms/tx: service (coordinator)")
    assert "│ nan │" in _row(text, "TCC CPU ms/tx: initiator process")


def _row(text: str, name: str) -> str:
    """The table's row ``name``, its cells' padding squeezed."""
    line = next(line for line in text.splitlines() if name in line)
    return " ".join(line.split())
