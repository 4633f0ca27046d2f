"""The group commit's coalescer: who shares a run, and what each caller is answered."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from reliable_msg.coalesce import Coalescer
from reliable_msg.errors import StoreError


class Recorder:
    """A batch function that records each run and answers ``item * 10``, failing on
    what ``bad`` names."""

    def __init__(self, bad: set[int] | None = None, outage: bool = False) -> None:
        self.runs: list[tuple[str, list[int]]] = []
        self.bad = bad or set()
        self.outage = outage
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()

    async def __call__(self, key: str, items: list[int]) -> Sequence[int]:
        self.runs.append((key, list(items)))
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.outage:
            raise StoreError("PostgreSQL unavailable")
        if self.bad.intersection(items):
            raise ValueError(f"bad item among {items}")
        return [i * 10 for i in items]


def coalescer(run: Recorder, **shape: float) -> Coalescer[str, int, int]:
    window = shape.get("window", 0.05)
    max_items = int(shape.get("max_items", 100))
    max_running = int(shape.get("max_running", 2))
    return Coalescer(
        run, window=window, max_items=max_items, max_running=max_running, distinct=lambda i: i
    )


async def test_calls_in_one_window_share_one_run_and_get_their_own_slice() -> None:
    run = Recorder()
    c = coalescer(run)
    answers = await asyncio.gather(c("p", [1, 2]), c("p", [3]), c("p", [4, 5, 6]))
    assert list(answers) == [[10, 20], [30], [40, 50, 60]]
    assert run.runs == [("p", [1, 2, 3, 4, 5, 6])]


async def test_keys_never_share_a_run() -> None:
    run = Recorder()
    c = coalescer(run)
    answers = await asyncio.gather(c("a", [1]), c("b", [2]), c("a", [3]))
    assert list(answers) == [[10], [20], [30]]
    assert sorted(run.runs) == [("a", [1, 3]), ("b", [2])]


async def test_a_repeated_identity_goes_to_the_next_batch() -> None:
    run = Recorder()
    c = coalescer(run)
    answers = await asyncio.gather(c("p", [1, 2]), c("p", [2]), c("p", [3]))
    assert list(answers) == [[10, 20], [20], [30]]
    assert run.runs == [("p", [1, 2]), ("p", [2, 3])]


async def test_a_full_batch_runs_without_waiting_for_the_window() -> None:
    run = Recorder()
    c = coalescer(run, window=60, max_items=3)
    answers = await asyncio.wait_for(asyncio.gather(c("p", [1, 2]), c("p", [3])), timeout=5)
    assert list(answers) == [[10, 20], [30]]
    assert run.runs == [("p", [1, 2, 3])]


async def test_a_call_too_large_to_share_runs_alone() -> None:
    run = Recorder()
    c = coalescer(run, max_items=3)
    answers = await asyncio.gather(c("p", [1, 2, 3, 4]), c("p", [5]))
    assert list(answers) == [[10, 20, 30, 40], [50]]
    assert sorted(run.runs) == [("p", [1, 2, 3, 4]), ("p", [5])]


async def test_calls_arriving_while_every_run_is_busy_join_the_next_batch() -> None:
    run = Recorder()
    run.gate = asyncio.Event()
    c = coalescer(run, window=0, max_running=1)
    first = asyncio.ensure_future(c("p", [1]))
    await run.started.wait()
    later = [asyncio.ensure_future(c("p", [i])) for i in (2, 3, 4)]
    await asyncio.sleep(0.01)
    assert run.runs == [("p", [1])]  # the others wait for the one running batch
    run.gate.set()
    assert await first == [10]
    assert [await f for f in later] == [[20], [30], [40]]
    assert run.runs == [("p", [1]), ("p", [2, 3, 4])]


async def test_an_outage_fails_every_caller_of_the_shared_run() -> None:
    run = Recorder(outage=True)
    c = coalescer(run)
    answers = await asyncio.gather(c("p", [1]), c("p", [2]), return_exceptions=True)
    assert all(isinstance(a, StoreError) for a in answers)
    assert run.runs == [("p", [1, 2])]  # not run again: an outage is no one call's doing


async def test_a_failure_named_shared_fails_every_caller_without_reruns() -> None:
    run = Recorder(bad={2})
    c: Coalescer[str, int, int] = Coalescer(
        run, window=0.05, max_items=100, max_running=2, shared_failures=(ValueError,)
    )
    results = await asyncio.gather(c("p", [1]), c("p", [2]), return_exceptions=True)
    assert all(isinstance(r, ValueError) for r in results), results
    assert run.runs == [("p", [1, 2])]


async def test_another_failure_is_retried_call_by_call_so_only_its_caller_fails() -> None:
    run = Recorder(bad={2})
    c = coalescer(run)
    answers = await asyncio.gather(c("p", [1]), c("p", [2, 3]), c("p", [4]), return_exceptions=True)
    assert answers[0] == [10]
    assert isinstance(answers[1], ValueError)
    assert answers[2] == [40]
    assert run.runs[0] == ("p", [1, 2, 3, 4])
    assert sorted(run.runs[1:]) == [("p", [1]), ("p", [2, 3]), ("p", [4])]


async def test_a_caller_that_goes_away_does_not_take_the_others_down() -> None:
    run = Recorder()
    run.gate = asyncio.Event()
    c = coalescer(run, window=0.01)
    leaving = asyncio.ensure_future(c("p", [1]))
    staying = asyncio.ensure_future(c("p", [2]))
    await run.started.wait()
    leaving.cancel()
    run.gate.set()
    assert await staying == [20]
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert run.runs == [("p", [1, 2])]


async def test_close_runs_what_waits_in_a_window_at_once() -> None:
    run = Recorder()
    c = coalescer(run, window=60)
    waiting = asyncio.ensure_future(c("p", [1]))
    await asyncio.sleep(0)
    await asyncio.wait_for(c.close(), timeout=5)
    assert await waiting == [10]


async def test_a_run_answering_the_wrong_count_fails_its_callers() -> None:
    async def short(key: str, items: list[int]) -> list[int]:
        return items[:-1]

    c: Coalescer[str, int, int] = Coalescer(short, window=0.05, max_items=10, max_running=1)
    answers = await asyncio.gather(c("p", [1]), c("p", [2]), return_exceptions=True)
    assert all(isinstance(a, RuntimeError) for a in answers)


def test_shapes_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="max_items"):
        coalescer(Recorder(), max_items=0)


async def test_close_cancelled_leaves_the_batches_to_answer_their_callers() -> None:
    """A shutdown that gives up waiting (its ``close`` cancelled) must not cancel the
    runs under way nor strand the calls waiting for a turn: each is answered."""
    run = Recorder()
    run.gate = asyncio.Event()
    c = coalescer(run, window=0, max_running=1)
    first = asyncio.ensure_future(c("p", [1]))
    await run.started.wait()
    second = asyncio.ensure_future(c("p", [2]))  # its batch waits for the running one
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(c.close())
    await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    run.gate.set()
    assert await first == [10]
    assert await second == [20]
    assert run.runs == [("p", [1]), ("p", [2])]


async def test_a_batch_cancelled_before_its_run_settles_its_callers() -> None:
    """A batch task cancelled while its calls wait for a turn (the loop shutting down)
    cancels them rather than leaving them waiting for ever."""
    run = Recorder()
    run.gate = asyncio.Event()
    c = coalescer(run, window=0, max_running=1)
    first = asyncio.ensure_future(c("p", [1]))
    await run.started.wait()
    waiting = [asyncio.ensure_future(c("p", [i])) for i in (2, 3)]
    await asyncio.sleep(0)
    batches = [t for t in asyncio.all_tasks() if t.get_name() == "batch:p"]
    assert len(batches) == 2  # the running one and the waiting one
    for task in batches:
        task.cancel()
    await asyncio.gather(*batches, return_exceptions=True)
    for _ in range(3):  # let the callers see their futures settled
        await asyncio.sleep(0)
    assert first.done() and all(w.done() for w in waiting)
    for call in (first, *waiting):
        with pytest.raises(asyncio.CancelledError):
            await call
    assert run.runs == [("p", [1])]
