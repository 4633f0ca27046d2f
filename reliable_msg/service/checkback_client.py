"""The check-back client: asks a producer whether a pending message's transaction
committed.

It calls only the ``check_url`` declared for the producer in configuration (never a URL
from a request), with the producer's token, a total timeout, and no redirects. How many
calls run at once is the check-back scanner's business (its slots).
"""

from __future__ import annotations

import json
from enum import StrEnum

import aiohttp

from reliable_msg.errors import CheckBackError
from reliable_msg.message import DueCheck
from reliable_msg.service.settings import CheckBackSettings, ProducerSettings


class Answer(StrEnum):
    #: The local transaction committed: confirm and publish.
    COMMITTED = "committed"
    #: The local transaction rolled back: cancel.
    ROLLED_BACK = "rolled_back"
    #: The producer cannot tell yet: ask again later.
    UNKNOWN = "unknown"


#: Largest check-back answer read; a valid one is a few dozen bytes.
MAX_ANSWER_BYTES = 4096


class CheckBackClient:
    def __init__(self, settings: CheckBackSettings) -> None:
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._settings.timeout),
            connector=aiohttp.TCPConnector(limit=self._settings.concurrency),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def ask(self, producer: ProducerSettings, check: DueCheck) -> Answer:
        """POST ``{id, topic, created_at}`` to the producer; raise :class:`CheckBackError`
        unless it answers 200 with a known status."""
        if self._session is None:
            raise RuntimeError("CheckBackClient.start() was not awaited")
        headers = {"Content-Type": "application/json"}
        if producer.token is not None:
            headers["Authorization"] = f"Bearer {producer.token.get_secret_value()}"
        body = {"id": check.id, "topic": check.topic, "created_at": check.created_at.isoformat()}
        try:
            async with self._session.post(
                str(producer.check_url), json=body, headers=headers, allow_redirects=False
            ) as response:
                raw = await response.content.read(MAX_ANSWER_BYTES)
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # str, not repr: a ClientResponseError's repr holds the request's headers, the
            # producer's token among them, and this error is logged and kept on the message
            raise CheckBackError(f"check-back call failed: {type(exc).__name__}: {exc}") from exc
        if status != 200:
            raise CheckBackError(f"check-back answered HTTP {status}")
        return _parse(raw)


def _parse(raw: bytes) -> Answer:
    try:
        status = json.loads(raw)["status"]
        return Answer(status)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckBackError(f"check-back answer is not understood: {raw[:200]!r}") from exc
