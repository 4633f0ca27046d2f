"""The narrow interfaces the coordinator's use-cases and its driver need of a store, as
:mod:`reliable_msg.service.ports` is for the messages'. The adapters are
:class:`reliable_msg.service.tcc.store.TccStore` and
:class:`reliable_msg.service.tcc.driving.Driving` (PostgreSQL)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from reliable_msg.service.tcc.rounds import Claimed, TccCounts
from reliable_msg.service.tcc.states import TxStatus
from reliable_msg.service.tcc.transaction import Decided, NewBranch, Transaction, TxPage


class TransactionStore(Protocol):
    async def begin(self, gid: str, initiator: str, seconds: float) -> Decided: ...

    async def register(
        self, gid: str, initiator: str, branches: Sequence[NewBranch], max_branches: int
    ) -> Decided: ...

    async def commit(self, gid: str, initiator: str) -> Decided: ...

    async def cancel(self, gid: str, initiator: str) -> Decided: ...

    async def retry(self, gid: str) -> Decided: ...

    async def get(self, gid: str, *, last_events: int | None = None) -> Transaction | None: ...

    async def page(
        self,
        *,
        status: TxStatus | None,
        stalled: bool | None,
        participant: str | None,
        initiator: str | None,
        limit: int,
        before: tuple[datetime, str] | None,
    ) -> TxPage: ...

    async def purge(self, older_than: float, batch: int) -> int: ...

    async def forget_gids(self, older_than: float, batch: int) -> int: ...


class DrivingStore(Protocol):
    """What :class:`~reliable_msg.service.tcc.driver.Driver` needs: see ``Driving``."""

    async def expire(self, instance: str, limit: int) -> list[str]: ...

    async def claim(
        self, owner: str, lease: float, limit: int, gid: str | None = None
    ) -> list[Claimed]: ...

    async def call_ok(self, tx: Claimed, branch: str, http_status: int, instance: str) -> bool: ...

    async def call_failed(
        self,
        tx: Claimed,
        branch: str,
        http_status: int | None,
        error: str,
        retry_in: float,
        instance: str,
    ) -> None: ...

    async def end_round(self, tx: Claimed, owner: str, instance: str, *, called: bool) -> bool: ...

    async def release(self, tx: Claimed, owner: str) -> None: ...

    async def flag_stalled(self, after: float, instance: str, limit: int) -> list[str]: ...

    async def counts(self) -> TccCounts: ...
