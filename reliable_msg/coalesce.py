"""Group commit: concurrent calls that arrive close together share one call.

A :class:`Coalescer` wraps a batch function ``run(key, items) -> results`` (one result
per item, in order). Calls for the same key join an open batch until it starts; a
batch starts when ``window`` has passed since it opened or it holds ``max_items``, and
at most ``max_running`` batches run at once, so under load a batch keeps taking calls
while it waits for a turn (the busier the service, the larger its batches) and a lone
call waits ``window`` at most. Each call gets its own slice of the results.

A batch that fails as a whole fails every call in it with the same error when the error
is an outage (:data:`~reliable_msg.errors.TRANSIENT`: nothing of it was written), or
another error its user names as no one call's doing (``shared_failures``: a rate limit
or a credential refused, say). Any other error may be one call's doing (its data), so
each call of a shared batch is then run again on its own and gets its own answer: one
caller's failure never fails the others.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from reliable_msg.errors import TRANSIENT

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
I = TypeVar("I")  # noqa: E741
R = TypeVar("R")


@dataclass(slots=True)
class _Call(Generic[I, R]):
    items: Sequence[I]
    answer: asyncio.Future[list[R]]


@dataclass(slots=True)
class _Batch(Generic[K, I, R]):
    key: K
    calls: list[_Call[I, R]] = field(default_factory=list)
    size: int = 0
    ids: set[Hashable] = field(default_factory=set)
    full: asyncio.Event = field(default_factory=asyncio.Event)


class Coalescer(Generic[K, I, R]):
    """Runs ``run`` once for the calls of a key that arrive together.

    ``distinct`` names an item's identity when two calls' items must never share a
    batch (two prepares of one id: each must see the other's outcome, not share one);
    a call that would repeat an identity goes to the next batch.
    """

    def __init__(
        self,
        run: Callable[[K, list[I]], Awaitable[Sequence[R]]],
        *,
        window: float,
        max_items: int,
        max_running: int,
        distinct: Callable[[I], Hashable] | None = None,
        name: str = "batch",
        sizes: Callable[[int], None] | None = None,
        shared_failures: tuple[type[Exception], ...] = TRANSIENT,
    ) -> None:
        if window < 0 or max_items < 1 or max_running < 1:
            raise ValueError("window >= 0, max_items >= 1 and max_running >= 1")
        self._run = run
        self._window = window
        self._max_items = max_items
        self._running = asyncio.Semaphore(max_running)
        self._distinct = distinct
        self._name = name
        self._sizes = sizes
        self._shared_failures = shared_failures
        self._open: dict[K, _Batch[K, I, R]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, key: K, items: Sequence[I]) -> list[R]:
        if not items:
            return []
        if len(items) >= self._max_items:
            return await self._alone(key, items)
        ids = [self._distinct(i) for i in items] if self._distinct is not None else []
        batch = self._open.get(key)
        if batch is None or not self._fits(batch, len(items), ids):
            if batch is not None:
                self._close(batch)
            batch = self._start(key)
        call: _Call[I, R] = _Call(items, asyncio.get_running_loop().create_future())
        batch.calls.append(call)
        batch.size += len(items)
        batch.ids.update(ids)
        if batch.size >= self._max_items:
            self._close(batch)
        # The batch runs to its end even when this caller goes away: others wait on it.
        return await asyncio.shield(call.answer)

    async def close(self) -> None:
        """Start every open batch now and wait for all to finish."""
        for batch in list(self._open.values()):
            self._close(batch)
        # asyncio.wait, not gather: a close that is cancelled (a shutdown giving up)
        # leaves the batches to run and answer their callers rather than cancelling them.
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    def _fits(self, batch: _Batch[K, I, R], size: int, ids: list[Hashable]) -> bool:
        if batch.size + size > self._max_items:
            return False
        return not batch.ids.intersection(ids)

    def _start(self, key: K) -> _Batch[K, I, R]:
        batch: _Batch[K, I, R] = _Batch(key)
        self._open[key] = batch
        task = asyncio.create_task(self._flush(batch), name=f"{self._name}:{key}")
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._ended, batch))
        return batch

    def _close(self, batch: _Batch[K, I, R]) -> None:
        """No call joins ``batch`` from now on; it runs as soon as it has a turn."""
        if self._open.get(batch.key) is batch:
            del self._open[batch.key]
        batch.full.set()

    def _ended(self, batch: _Batch[K, I, R], task: asyncio.Task[None]) -> None:
        """Whatever ended ``batch``'s task (cancelled at shutdown, even before it began,
        or a bug), no call of it waits for ever, and none joins it any more."""
        self._tasks.discard(task)
        self._close(batch)
        error: BaseException
        if task.cancelled():
            error = asyncio.CancelledError()
        elif (failure := task.exception()) is not None:
            log.error("a %s of %d calls failed", self._name, len(batch.calls), exc_info=failure)
            error = failure
        else:
            error = RuntimeError(f"a {self._name} ended without answering")
        for call in batch.calls:
            _settle(call, error)

    async def _flush(self, batch: _Batch[K, I, R]) -> None:
        if self._window > 0:
            try:
                async with asyncio.timeout(self._window):
                    await batch.full.wait()
            except TimeoutError:
                pass
        async with self._running:
            self._close(batch)
            if self._sizes is not None:
                self._sizes(batch.size)
            if len(batch.calls) == 1:
                [call] = batch.calls
                await self._answer(call, self._run(batch.key, list(call.items)))
            else:
                await self._shared(batch)

    async def _shared(self, batch: _Batch[K, I, R]) -> None:
        """One run for every call of ``batch``, each answered with its slice."""
        try:
            results = await self._run(batch.key, [i for c in batch.calls for i in c.items])
        except self._shared_failures as exc:
            for call in batch.calls:
                _settle(call, exc)
            return
        except Exception:
            log.warning(
                "a shared %s of %d calls failed; running each on its own",
                self._name,
                len(batch.calls),
                exc_info=True,
            )
            await asyncio.gather(
                *(self._answer(c, self._run(batch.key, list(c.items))) for c in batch.calls)
            )
            return
        except BaseException as exc:  # cancelled: the callers must not wait for ever
            for call in batch.calls:
                _settle(call, exc)
            raise
        if len(results) != batch.size:
            error = RuntimeError(f"{self._name} answered {len(results)} of {batch.size}")
            for call in batch.calls:
                _settle(call, error)
            return
        start = 0
        for call in batch.calls:
            end = start + len(call.items)
            if not call.answer.done():
                call.answer.set_result(list(results[start:end]))
            start = end

    async def _alone(self, key: K, items: Sequence[I]) -> list[R]:
        async with self._running:
            if self._sizes is not None:
                self._sizes(len(items))
            return list(await self._run(key, list(items)))

    @staticmethod
    async def _answer(call: _Call[I, R], run: Awaitable[Sequence[R]]) -> None:
        try:
            results = await run
        except BaseException as exc:
            _settle(call, exc)
            if not isinstance(exc, Exception):
                raise
        else:
            if not call.answer.done():
                call.answer.set_result(list(results))


def _settle(call: _Call[I, R], exc: BaseException) -> None:
    if call.answer.done():
        return
    if isinstance(exc, asyncio.CancelledError):
        call.answer.cancel()
    else:
        call.answer.set_exception(exc)
