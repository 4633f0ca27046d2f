"""Which failure :meth:`GlobalTransaction.try_all` raises when several Trys fail: the
first to happen, not the first in the list. The registration and the Trys are doubles
(no I/O) so that the order in which the failures happen is fixed."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from reliable_msg.errors import TryFailed
from reliable_msg.sdk.tcc import Branch, Initiator
from reliable_msg.sdk.tcc.initiator import GlobalTransaction


class Registrar:
    """The coordinator's answer to a registration: a Try URL and a proof per branch."""

    async def call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        return {"branches": [{"try_url": "", "proof": ""} for _ in body["branches"]]}


class Trys:
    """``inventory`` fails late (once ``credit`` has failed), ``credit`` at once, and
    ``wms`` never answers (it is cancelled)."""

    def __init__(self) -> None:
        self.client = Registrar()
        self.credit_failed = asyncio.Event()
        self.wms_cancelled = False

    async def call_try(self, gid: str, branch: Branch, registered: dict[str, Any]) -> None:
        if branch.participant == "credit":
            self.credit_failed.set()
            raise TryFailed("credit failed first", participant="credit")
        if branch.participant == "inventory":
            await self.credit_failed.wait()
            raise TryFailed("inventory failed after", participant="inventory")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.wms_cancelled = True
            raise


async def test_the_first_failure_to_happen_is_raised_and_the_rest_cancelled() -> None:
    trys = Trys()
    tx = GlobalTransaction(cast(Initiator, trys), "g1", {"status": "trying"})
    branches = [Branch("inventory", "b1"), Branch("credit", "b2"), Branch("wms", "b3")]
    with pytest.raises(TryFailed) as raised:
        await tx.try_all(branches)
    assert raised.value.participant == "credit", raised.value
    assert tx.failure is raised.value
    assert trys.wms_cancelled
