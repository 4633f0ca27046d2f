"""The API's prepares, confirms and acks under group commit.

Concurrent calls of one producer (prepare, confirm) or one group (ack) that arrive
within ``group_commit.window`` share one call of the use-case: one statement, one
transaction and one batch of publishes with confirms. Nothing of DESIGN §3 changes: a
confirm still answers only after its row committed and the broker confirmed its
publish, and each message still gets its own result (a refused publish leaves only its
message ``pending``, see :meth:`PgStore.confirm`). Scanners, the dashboard and the admin
commands call the use-cases directly.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import TypeVar

from reliable_msg.coalesce import Coalescer
from reliable_msg.errors import ReliableMsgError
from reliable_msg.message import NewMessage
from reliable_msg.metrics import GROUP_COMMIT_SIZE
from reliable_msg.service.settings import GroupCommitSettings
from reliable_msg.service.usecases import Acked, Prepared, Result, UseCases

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit:
    """:meth:`UseCases.prepare`, :meth:`UseCases.confirm` and :meth:`UseCases.ack`, with
    concurrent calls sharing one run (or passed straight through when disabled)."""

    def __init__(self, usecases: UseCases, settings: GroupCommitSettings) -> None:
        self._usecases = usecases
        self._on = settings.enabled
        self._prepare: Coalescer[str, NewMessage, Prepared | ReliableMsgError] = _coalescer(
            self._prepare_in_id_order, "prepare", settings, distinct=lambda m: m.id
        )
        self._confirm: Coalescer[str, str, Result] = _coalescer(
            usecases.confirm, "confirm", settings
        )
        self._ack: Coalescer[str, str, Acked | ReliableMsgError] = _coalescer(
            usecases.ack, "ack", settings
        )

    async def prepare(
        self, producer: str, items: Sequence[NewMessage]
    ) -> list[Prepared | ReliableMsgError]:
        if not self._on:
            return await self._usecases.prepare(producer, items)
        return await self._prepare(producer, items)

    async def confirm(self, producer: str, ids: Sequence[str]) -> list[Result]:
        if not self._on:
            return await self._usecases.confirm(producer, ids)
        return await self._confirm(producer, ids)

    async def ack(self, group: str, ids: Sequence[str]) -> list[Acked | ReliableMsgError]:
        if not self._on:
            return await self._usecases.ack(group, ids)
        return await self._ack(group, ids)

    async def close(self) -> None:
        """Run what is waiting in a window now, and wait for every shared run to end."""
        for coalescer in (self._prepare, self._confirm, self._ack):
            await coalescer.close()

    # New rows are written in id order, so that two shared prepares holding the same ids
    # (repeats of one request) wait on each other instead of deadlocking. (A confirm's
    # UPDATE locks in its plan's order whatever the order of its ids; a deadlock there is
    # retried by the store.)

    async def _prepare_in_id_order(
        self, producer: str, items: list[NewMessage]
    ) -> list[Prepared | ReliableMsgError]:
        return await _in_order(items, lambda m: m.id, lambda s: self._usecases.prepare(producer, s))


def _coalescer(
    run: Callable[[str, list[T]], Awaitable[Sequence[R]]],
    name: str,
    settings: GroupCommitSettings,
    distinct: Callable[[T], Hashable] | None = None,
) -> Coalescer[str, T, R]:
    return Coalescer(
        run,
        window=settings.window,
        max_items=settings.max_items,
        max_running=settings.max_running,
        distinct=distinct,
        name=name,
        sizes=GROUP_COMMIT_SIZE.labels(name).observe,
    )


async def _in_order(
    items: list[T], key: Callable[[T], str], run: Callable[[list[T]], Awaitable[list[R]]]
) -> list[R]:
    """``run`` over ``items`` sorted by ``key``; its results in the order of ``items``."""
    order = sorted(range(len(items)), key=lambda i: key(items[i]))
    results = await run([items[i] for i in order])
    answers: dict[int, R] = dict(zip(order, results, strict=True))
    return [answers[i] for i in range(len(items))]
