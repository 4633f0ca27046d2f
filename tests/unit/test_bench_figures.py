"""The benchmark's arithmetic: latency phases per message and the figures table."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from reliable_msg.tools.bench import e2e, report


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


def _path(rate: float, *, latency: bool = False, p99: float = 12.0) -> dict[str, Any]:
    cpu = {
        "service": 1.5,
        "producers": 0.5,
        "consumer": 0.25,
        "postgres": 1.0,
        "rabbitmq": 0.25,
        "machine": 6.0,
    }
    out: dict[str, Any] = {
        "msgs_per_s": rate,
        "service_cpu_s_per_1000": 1.5,
        "cpu_ms_per_msg": cpu,
        "machine_busy": 0.5,
    }
    if latency:
        out.update(p50_ms=3.0, p99_ms=p99, max_ms=20.0)
        out["phases_ms"] = {
            "confirm_call": {"p50_ms": 3.3, "p99_ms": 11.5, "max_ms": 43.0},
            "confirm_to_arrival": {"p50_ms": 2.4, "p99_ms": 8.9, "max_ms": 16.0},
            "arrival_to_handler": {"p50_ms": 0.4, "p99_ms": 3.1, "max_ms": 14.0},
        }
    return out


def _results() -> dict[str, Any]:
    return {
        "floor": {
            "requests": 5000,
            "in_flight": 32,
            "requests_per_s": 3000.0,
            "ms_per_request": 0.5,
            "cpu_ms_per_request": {"server": 0.3, "client": 0.2, "machine": 0.6},
            "machine_busy": 0.9,
        },
        "ceilings": {
            "postgres_insert_update_update_msgs_per_s": 4000.0,
            "rabbitmq_publish_confirm_msgs_per_s": 5000.0,
            "rabbitmq_consume_ack_msgs_per_s": 8000.0,
        },
        "scanner": {"small": {"pass_ms": 8.0}, "big": {"pass_ms": 9.0}},
        "paths": {
            "single": _path(280.0),
            "batch": _path(1200.0),
            "latency": [_path(140.0, latency=True, p99=p99) for p99 in (12.0, 12.0, 12.0)],
            "degraded": _path(100.0),
        },
        "tcc": {
            "transactions": 3000,
            "tx_per_s": 120.5,
            "p50_ms": 80.0,
            "p99_ms": 210.0,
            "max_ms": 300.0,
            "machine_busy": 0.97,
            "cpu_ms_per_tx": {
                "service": 4.25,
                "participants": 3.5,
                "initiator": 0.5,
                "postgres": 1.0,
                "machine": 15.0,
            },
            "phases_ms": {
                "begin_to_committed": {"p99_ms": 150.0},
                "committed_to_confirmed": {"p99_ms": 70.0},
            },
        },
    }


def test_the_table_shows_every_figure_and_judges_every_target() -> None:
    results = _results()
    figures = report.figures_of(results)
    results["figures"] = figures
    results["targets"] = report.targets_of(figures)

    console = Console(width=200, record=True)
    console.print(report.summary_table(results))
    text = console.export_text()

    assert figures["latency_phases_p99_ms"] == {
        "confirm_call": 11.5,
        "confirm_to_arrival": 8.9,
        "arrival_to_handler": 3.1,
    }
    assert "11.5 / 8.9 / 3.1" in text
    assert "3.0 / 12.0 / 20.0" in text
    # CPU 3.5 ms = 7 F: met; 280 msgs/s; batch 7 F; 1200 msgs/s; p99; scanner; degraded 0.36;
    # TCC 120.5
    assert [t["met"] for t in results["targets"]] == [
        True,
        False,
        False,
        False,
        True,
        True,
        False,
        False,
    ]
    assert text.count("NOT met") == 5
    assert "│ 7.0 F = 3.50 ms │ <= 7 F: met" in _row(text, "target: single-message API, CPU")
    assert "│ 0.500 │ client 0.200 + server 0.300" in _row(text, "floor F")
    assert "│ 1.50 ms = 3.0 F / 1.50 ms = 3.0 F │" in _row(
        text, "CPU per message single / batch: service"
    )
    assert "│ 120.5 │" in _row(text, "TCC, 3 branches: global transactions/s")
    assert "│ 80.0 / 210.0 / 300.0 │" in _row(text, "TCC begin -> all confirmed")
    assert "│ 150.0 / 70.0 │" in _row(text, "of which p99: begin -> commit answered")
    assert "│ 4.25 ms = 8.5 F │" in _row(text, "TCC CPU per transaction: service (coordinator)")
    assert "│ 0.50 ms = 1.0 F │" in _row(text, "TCC CPU per transaction: initiator process")


def _row(text: str, name: str) -> str:
    """The table's row ``name``, its cells' padding squeezed."""
    line = next(line for line in text.splitlines() if name in line)
    return " ".join(line.split())


def test_every_cpu_figure_is_also_a_multiple_of_the_floor() -> None:
    figures = report.figures_of(_results())

    assert figures["floor_ms_per_request"] == 0.5
    for name in ("single", "batch", "degraded"):
        assert figures[f"{name}_cpu_ms_per_msg_total"] == 3.5  # the five groups, no machine
        assert figures[f"{name}_cpu_floor_multiple"] == 7.0
        assert figures["cpu_floor_multiples"][name] == {
            "service": 3.0,
            "producers": 1.0,
            "consumer": 0.5,
            "postgres": 2.0,
            "rabbitmq": 0.5,
            "machine": 12.0,
        }
    assert figures["tcc_cpu_ms_per_tx_total"] == 9.25
    assert figures["tcc_cpu_floor_multiple"] == 18.5
    assert figures["cpu_floor_multiples"]["tcc"]["participants"] == 7.0


def test_without_the_floor_the_multiples_are_not_measured() -> None:
    results = _results()
    del results["floor"]
    figures = report.figures_of(results)
    targets = {t["key"]: t["met"] for t in report.targets_of(figures)}

    assert "floor_ms_per_request" not in figures
    assert figures["single_cpu_floor_multiple"] is None
    assert targets["single_cpu_floor_multiple"] is None
    assert targets["single_msgs_per_s"] is False


def test_the_latency_target_is_the_worst_of_three_runs() -> None:
    results = _results()
    results["paths"]["latency"] = [
        _path(140.0, latency=True, p99=p99) for p99 in (12.0, 61.0, 30.0)
    ]
    figures = report.figures_of(results)
    targets = {t["key"]: t["met"] for t in report.targets_of(figures)}
    assert figures["latency_p99_ms"] == 61.0
    assert [r["p99_ms"] for r in figures["latency_runs"]] == [12.0, 61.0, 30.0]
    assert targets["latency_p99_ms"] is False

    results["paths"]["latency"] = [_path(140.0, latency=True) for _ in range(2)]
    figures = report.figures_of(results)
    assert figures["latency_p99_ms"] != figures["latency_p99_ms"]  # NaN: two runs of three
    assert {t["key"]: t["met"] for t in report.targets_of(figures)}["latency_p99_ms"] is None


def test_a_partial_run_judges_only_what_it_measured() -> None:
    results = {"floor": _results()["floor"], "paths": {"single": _path(600.0)}}
    figures = report.figures_of(results)
    met = {t["key"]: t["met"] for t in report.targets_of(figures)}

    assert met["single_cpu_floor_multiple"] is True
    assert met["single_msgs_per_s"] is True
    assert met["batch_msgs_per_s"] is None
    assert met["tcc_tx_per_s"] is None
    console = Console(width=200, record=True)
    console.print(
        report.summary_table({**results, "figures": figures, "targets": report.targets_of(figures)})
    )
    assert "│ 600.0 │" in _row(console.export_text(), "end to end, single-message API")


def test_a_cpu_figure_prints_in_ms_and_in_floors() -> None:
    assert report.in_floor(7.9, 0.55) == "7.90 ms = 14.4 F"
    assert report.in_floor(7.9, None) == "7.90 ms"
    assert report.in_floor(float("nan"), 0.55) == "nan"
    assert report.floor_multiple(7.9, 0.55) == 14.36
    assert report.floor_multiple(7.9, None) is None


def test_a_cpu_sum_missing_a_group_it_sums_is_not_measured() -> None:
    """A group the run found no process of (RabbitMQ or PostgreSQL in a container of its
    own, say) is not 0 ms: the sum, its multiple and its target are not measured."""
    results = {"floor": _results()["floor"], "paths": {"single": _path(600.0)}}
    del results["paths"]["single"]["cpu_ms_per_msg"]["rabbitmq"]
    tcc = _results()["tcc"]
    del tcc["cpu_ms_per_tx"]["initiator"]
    results["tcc"] = tcc
    figures = report.figures_of(results)
    targets = report.targets_of(figures)
    met = {t["key"]: t["met"] for t in targets}

    assert figures["single_cpu_ms_per_msg_total"] is None
    assert figures["single_cpu_floor_multiple"] is None
    assert met["single_cpu_floor_multiple"] is None
    assert met["single_msgs_per_s"] is True
    assert figures["tcc_cpu_ms_per_tx_total"] is None
    assert figures["tcc_cpu_floor_multiple"] is None
    console = Console(width=200, record=True)
    console.print(report.summary_table({**results, "figures": figures, "targets": targets}))
    text = console.export_text()
    assert "not measured: no rabbitmq" in _row(text, "CPU per message, single: service")
    assert "not measured: no initiator" in _row(text, "TCC CPU per transaction: service +")
    assert "not measured" in _row(text, "target: single-message API, CPU")
