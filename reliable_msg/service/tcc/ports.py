"""The narrow interface the coordinator's use-cases need of a store, as
:mod:`reliable_msg.service.ports` is for the messages'. The adapter is
:class:`reliable_msg.service.tcc.store.TccStore` (PostgreSQL)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

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

    async def get(self, gid: str) -> Transaction | None: ...

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
