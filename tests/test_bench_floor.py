"""The benchmark's floor F, measured for real: a bare FastAPI route under uvicorn in a
process of its own, called by an aiohttp client in another; through the command line,
its JSON, and its bad options refused."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from reliable_msg.tools.bench import floor

BENCH = [str(Path(sys.executable).parent / "reliable-msg"), "bench"]


async def _bench(*args: str, cwd: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *BENCH,
        *args,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"COLUMNS": "200", "PATH": str(Path(sys.executable).parent)},
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_floor_part_alone_writes_f_and_its_two_processes(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    code, out, err = await _bench(
        "--parts", "floor", "--floor-requests", "500", "--json", str(path), cwd=tmp_path
    )
    assert code == 0, err

    results = json.loads(path.read_text())
    measured = results["floor"]
    cpu = measured["cpu_ms_per_request"]
    assert measured["requests"] == 500
    assert measured["in_flight"] == 32
    assert cpu["client"] > 0 and cpu["server"] > 0
    assert measured["ms_per_request"] == pytest.approx(cpu["client"] + cpu["server"], abs=2e-4)
    assert results["figures"]["floor_ms_per_request"] == measured["ms_per_request"] > 0
    # nothing else measured: every target says so
    assert [t["met"] for t in results["targets"]] == [None] * len(results["targets"])
    assert "floor F: CPU ms of one bare HTTP round trip" in out
    assert "not measured" in out


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--parts", "floor,flor"], "--parts: flor; choose from floor, ceilings"),
        (["--paths", " , "], "--paths: none given"),
        (["--parts", "floor", "--floor-requests", "0"], "--floor-requests: 0; at least 1"),
        # the latency runs' rate is half the single run's peak: without it, nothing to run
        (["--parts", "paths", "--paths", "latency"], "--paths: latency needs single"),
        # counts of nothing: a division by zero after the service started, not a refusal
        (["--parts", "paths", "--paths", "batch", "--batch", "0"], "'--batch': 0 is not in"),
        (["--parts", "paths", "--paths", "single", "--messages", "0"], "'--messages': 0 is not"),
    ],
)
async def test_bad_bench_options_are_refused_before_anything_runs(
    tmp_path: Path, args: list[str], said: str
) -> None:
    code, _, err = await _bench(*args, "--json", str(tmp_path / "r.json"), cwd=tmp_path)
    assert code == 2
    assert said in err
    assert not (tmp_path / "r.json").exists()


async def test_a_floor_of_no_requests_is_refused() -> None:
    with pytest.raises(ValueError, match="floor: requests 0"):
        await floor.measure(requests=0)
