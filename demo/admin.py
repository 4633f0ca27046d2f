"""The reliable-msg service as its admin sees it: stats, messages, metrics, TCC
transactions."""

from __future__ import annotations

from typing import Any

import aiohttp

from reliable_msg.sdk.client import RetryPolicy, ServiceClient

#: Admin calls are polled; a failure is tried again at the next poll.
QUICK = RetryPolicy(attempts=2, initial=0.1, max_wait=0.2, deadline=2.0)
#: The largest page ``GET /v1/messages`` gives.
PAGE = 1000


class ServiceAdmin:
    def __init__(self, base_url: str, token: str) -> None:
        self._client = ServiceClient(base_url, token, retry=QUICK, timeout=5.0)
        self._base = base_url.rstrip("/")

    async def close(self) -> None:
        await self._client.close()

    async def message_counts(self) -> dict[str, int]:
        """Messages per status, from ``GET /v1/stats``."""
        stats = await self._client.call("GET", "/v1/stats")
        return {str(k): int(v) for k, v in stats.get("messages", {}).items()}

    async def broker(self) -> dict[str, Any]:
        """Mode, switch history and fallback depth: ``broker`` of ``GET /v1/stats``."""
        stats = await self._client.call("GET", "/v1/stats")
        broker = stats.get("broker")
        return broker if isinstance(broker, dict) else {}

    async def metrics(self) -> str:
        """The Prometheus text of ``GET /metrics``; empty if it does not answer."""
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
                session.get(f"{self._base}/metrics") as response,
            ):
                return await response.text() if response.status == 200 else ""
        except (aiohttp.ClientError, TimeoutError, OSError):
            return ""

    async def message_statuses(self) -> dict[str, str]:
        """Every message's status by id, from ``GET /v1/messages`` page by page."""
        statuses: dict[str, str] = {}
        cursor: str | None = None
        while True:
            path = f"/v1/messages?limit={PAGE}" + (f"&cursor={cursor}" if cursor else "")
            page = await self._client.call("GET", path)
            statuses.update((m["id"], m["status"]) for m in page["messages"])
            cursor = page.get("next_cursor")
            if not cursor:
                return statuses

    async def tcc_transaction(self, gid: str) -> dict[str, Any]:
        """One TCC transaction with its branches and events (``GET /v1/tcc/transactions/
        {gid}``)."""
        return await self._client.call("GET", f"/v1/tcc/transactions/{gid}")

    async def tcc_transactions(self) -> dict[str, dict[str, Any]]:
        """Every TCC transaction's summary by gid, from ``GET /v1/tcc/transactions`` page
        by page."""
        found: dict[str, dict[str, Any]] = {}
        cursor: str | None = None
        while True:
            path = "/v1/tcc/transactions?limit=500" + (f"&cursor={cursor}" if cursor else "")
            page = await self._client.call("GET", path)
            found.update((t["gid"], t) for t in page["items"])
            cursor = page.get("next_cursor")
            if not cursor:
                return found
