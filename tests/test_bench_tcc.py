"""The benchmark's TCC figure, produced by a small real run: a coordinator process, three
participant processes and an initiator process; its CPU in multiples of a real floor F;
the books it checks, and their check failing once tampered with."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest
from rich.console import Console

from reliable_msg.tools.bench import floor, report, run, tcc
from tests.conftest import AMQP_URL, SERVER_URL, TEST_PREFIX, _drop_database

REDIS_URL = "redis://127.0.0.1:6379/0"
NAMES = f"{TEST_PREFIX}{os.getpid()}.benchtcc"


async def _remove_topology() -> None:
    connection = await aio_pika.connect(AMQP_URL)
    try:
        for queue in (f"{NAMES}.bench", f"{NAMES}.bench.dlq", f"{NAMES}._probe"):
            async with connection.channel() as channel:
                await channel.queue_delete(queue)
        for exchange in (NAMES, f"{NAMES}.dlx"):
            async with connection.channel() as channel:
                await channel.exchange_delete(exchange)
    finally:
        await connection.close()


async def test_a_small_tcc_run_gives_its_figures_and_checks_its_books(tmp_path: Path) -> None:
    pid = os.getpid()
    databases = tcc.Databases(
        f"{SERVER_URL}/rmsg_test_{pid}_bench_tcc", f"{SERVER_URL}/rmsg_test_{pid}_bench_parties"
    )
    try:
        result = await tcc.run_tcc(
            tmp_path, databases, AMQP_URL, REDIS_URL, transactions=20, concurrency=4, names=NAMES
        )
        summary = result.summary()
        assert summary["transactions"] == 20
        assert summary["branches"] == 3
        assert summary["tx_per_s"] > 0
        assert 0 < summary["p50_ms"] <= summary["p99_ms"] <= summary["max_ms"]
        assert set(summary["phases_ms"]) == {
            "begin_to_confirmed",
            "begin_to_committed",
            "committed_to_confirmed",
        }
        cpu = summary["cpu_ms_per_tx"]
        assert set(cpu) == set(tcc.CPU_GROUPS)
        assert all(cpu[g] > 0 for g in ("service", "participants", "initiator", "postgres"))

        # the same run's floor, measured for real, and the multiples of it in the JSON
        measured = (await floor.measure(requests=500, warm_up=50)).summary()
        results: dict[str, Any] = {"floor": measured, "tcc": summary}
        results["figures"] = report.figures_of(results)
        results["targets"] = report.targets_of(results["figures"])
        run.write_json(results, tmp_path / "results.json")
        figures = json.loads((tmp_path / "results.json").read_text())["figures"]
        f = figures["floor_ms_per_request"]
        assert f == measured["ms_per_request"] > 0
        total = sum(cpu[g] for g in ("service", "participants", "initiator", "postgres"))
        assert figures["tcc_cpu_ms_per_tx_total"] == pytest.approx(total, abs=1e-3)
        assert figures["tcc_cpu_floor_multiple"] == pytest.approx(total / f, abs=0.01)
        assert figures["cpu_floor_multiples"]["tcc"] == {
            group: pytest.approx(ms / f, abs=0.01) for group, ms in cpu.items()
        }

        console = Console(width=200, record=True)
        console.print(report.tcc_table(summary, f))
        text = " ".join(console.export_text().split())  # the cells' padding squeezed
        assert f"TCC, 3 branches: global transactions/s │ {summary['tx_per_s']} │" in text
        assert (
            f"TCC CPU per transaction: participant processes (3) │ "
            f"{cpu['participants']:.2f} ms = {cpu['participants'] / f:.1f} F │"
        ) in text

        # the books it checked, tampered with: one Confirm's effect undone
        conn = await asyncpg.connect(databases.parties)
        try:
            await conn.execute(
                "UPDATE tcc_credit.account SET frozen = frozen + 1, taken = taken - 1"
            )
        finally:
            await conn.close()
        with pytest.raises(tcc.BooksWrong, match=r"credit: available \d+, frozen 1, taken 19"):
            await tcc.check_books(databases.parties, 20)
    finally:
        await _remove_topology()
        await _drop_database(databases.service)
        await _drop_database(databases.parties)
