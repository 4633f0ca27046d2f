"""The failures the demo injects into the order service, per request.

``fail=local``: the payment's local transaction raises :class:`LocalFailure` after its
update, so it rolls back and the producer SDK cancels the message.

``crash=after_commit``: :class:`CrashingClient` kills this process with SIGKILL when the
SDK is about to confirm the order's message, that is after the local transaction
committed and before the service heard of it. Only the service's check-back can then
deliver the message, which it does by asking ``/rmsg/check-back`` after the restart.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Sequence
from typing import Any

from reliable_msg.sdk.client import ItemResult, ServiceClient

log = logging.getLogger(__name__)


class LocalFailure(RuntimeError):
    """The injected failure of a payment's local transaction."""


class CrashingClient(ServiceClient):
    """The service client of the producer SDK, which dies before confirming a doomed id."""

    def __init__(self, base_url: str, token: str) -> None:
        super().__init__(base_url, token)
        self._doomed: set[str] = set()

    def doom(self, message_id: str) -> None:
        """Die when the SDK confirms ``message_id``."""
        self._doomed.add(message_id)

    async def confirm(self, id: str) -> dict[str, Any]:
        self._die_if_doomed([id])
        return await super().confirm(id)

    async def confirm_many(self, ids: Sequence[str]) -> list[ItemResult]:
        self._die_if_doomed(ids)
        return await super().confirm_many(ids)

    def _die_if_doomed(self, ids: Sequence[str]) -> None:
        doomed = self._doomed.intersection(ids)
        if doomed:
            log.warning("injected crash: committed %s, dying before the confirm", sorted(doomed))
            os.kill(os.getpid(), signal.SIGKILL)
