"""The order service's HTTP API, as a customer's client sees it (aiohttp)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import aiohttp

from .errors import DemoError


@dataclass(frozen=True, slots=True)
class Answer:
    """What a request got: an HTTP status and body, or no answer at all."""

    status: int | None  #: None when the connection broke (the service died)
    body: dict[str, Any]
    error: str | None = None

    @property
    def summary(self) -> str:
        if self.status is None:
            return f"no answer ({self.error})"
        return f"HTTP {self.status} {self.code or self.body.get('status', '')}"

    @property
    def code(self) -> str | None:
        error = self.body.get("error")
        return str(error.get("code")) if isinstance(error, dict) else None


class Shop:
    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self._base = base_url.rstrip("/")
        self._session = session

    async def create(self, member_id: int, sku: str, qty: int, amount: Decimal) -> int:
        body = {"member_id": member_id, "sku": sku, "qty": qty, "amount": str(amount)}
        answer = await self._request("POST", "/orders", body)
        if answer.status != 201:
            raise DemoError(f"creating an order: {answer.status} {answer.body or answer.error}")
        order_id: int = answer.body["id"]
        return order_id

    async def pay(self, order_id: int, query: dict[str, str]) -> Answer:
        return await self._request("POST", f"/orders/{order_id}/pay", params=query)

    async def get(self, order_id: int) -> Answer:
        return await self._request("GET", f"/orders/{order_id}")

    async def wait_healthy(self, within: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while (await self._request("GET", "/health")).status != 200:
            if loop.time() > deadline:
                raise DemoError(f"the order service at {self._base} is not healthy")
            await asyncio.sleep(0.1)

    async def _request(
        self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None
    ) -> Answer:
        try:
            async with self._session.request(
                method, self._base + path, json=body, params=params
            ) as response:
                data = await response.json(content_type=None)
                return Answer(response.status, data if isinstance(data, dict) else {})
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            return Answer(None, {}, type(exc).__name__)
