"""The HTTP client of the service, shared by the producer and consumer SDKs.

Every call of the API is idempotent (a prepare carries its id), so transient failures
(connection errors, timeouts, 5xx) are retried with exponential backoff, and a 429 of the
rate limit no sooner than its ``Retry-After``; what is left after the retries is raised
as :class:`ServiceUnavailable`, the broker error the service reported or
:class:`RateLimited`. Other errors are raised at once, typed from the one exception tree.

Given several instances' URLs instead of one, the client sends each try of each call to
the next of them in turn, so calls spread over the instances and a retry goes to another.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from reliable_msg.errors import (
    TRANSIENT,
    BadRequest,
    Code,
    Conflict,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ReliableMsgError,
    RequestError,
    ServiceUnavailable,
    Unauthorized,
    Unprocessable,
    Unroutable,
)

#: Failures worth another try of the same call: an outage, a broker that had no queue
#: for the message yet, and the rate limit.
RETRIED: tuple[type[ReliableMsgError], ...] = (*TRANSIENT, Unroutable, RateLimited)

_CODES = {str(code): code for code in Code}

#: The error for an HTTP status of the service, when its code is one this SDK does not know.
_BY_STATUS: dict[int, type[ReliableMsgError]] = {
    kind.status: kind
    for kind in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        MethodNotAllowed,
        Conflict,
        PayloadTooLarge,
        Unprocessable,
        RateLimited,
    )
}


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 6  #: tries of one call, the first included
    initial: float = 0.1  #: first wait in seconds, doubling after each try
    max_wait: float = 2.0  #: longest single wait
    deadline: float = 15.0  #: give up after this many seconds in all


@dataclass(frozen=True, slots=True)
class ItemResult:
    """One item of a batch answer."""

    id: str
    ok: bool
    status: str | None
    created: bool | None
    error: ReliableMsgError | None
    #: Batch ack: when the delivery became done, if it was before this ack (a repeat).
    done_at: datetime | None = None


class ServiceClient:
    """Calls the reliable-msg HTTP API with a bearer token, at one URL or at several
    instances' URLs in turn."""

    def __init__(
        self,
        base_url: str | Sequence[str],
        token: str,
        *,
        retry: RetryPolicy | None = None,
        timeout: float = 10.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls or not all(isinstance(u, str) and u for u in urls):
            raise ValueError(f"base_url: a URL or a list of URLs, not {base_url!r}")
        self._bases = [u.rstrip("/") for u in urls]
        self._turn = itertools.cycle(range(len(self._bases)))
        self._headers = {"Authorization": f"Bearer {token}"}
        self._retry = retry or RetryPolicy()
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session = session
        self._own_session = session is None

    async def __aenter__(self) -> ServiceClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    # -- producer calls ----------------------------------------------------------------

    async def prepare(self, message: dict[str, Any]) -> dict[str, Any]:
        return await self.call("POST", "/v1/messages", message)

    async def prepare_many(self, messages: Sequence[dict[str, Any]]) -> list[ItemResult]:
        return _items(await self.call("POST", "/v1/batch/prepare", {"messages": list(messages)}))

    async def confirm(self, id: str) -> dict[str, Any]:
        return await self.call("POST", f"/v1/messages/{id}/confirm")

    async def confirm_many(self, ids: Sequence[str]) -> list[ItemResult]:
        return _items(await self.call("POST", "/v1/batch/confirm", {"ids": list(ids)}))

    async def cancel(self, id: str) -> dict[str, Any]:
        return await self.call("POST", f"/v1/messages/{id}/cancel")

    async def cancel_many(self, ids: Sequence[str]) -> list[ItemResult]:
        return _items(await self.call("POST", "/v1/batch/cancel", {"ids": list(ids)}))

    async def get(self, id: str) -> dict[str, Any]:
        return await self.call("GET", f"/v1/messages/{id}")

    # -- consumer calls ----------------------------------------------------------------

    async def ack_many(self, ids: Sequence[str]) -> list[ItemResult]:
        return _items(await self.call("POST", "/v1/batch/ack", {"ids": list(ids)}))

    # -- plumbing ----------------------------------------------------------------------

    async def call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """One API call, retried on transient failures; returns the JSON answer."""
        policy = self._retry
        retrying = AsyncRetrying(
            stop=stop_after_attempt(policy.attempts) | stop_after_delay(policy.deadline),
            wait=_RetryAfter(
                wait_exponential_jitter(
                    multiplier=policy.initial, max=policy.max_wait, jitter=policy.initial
                )
            ),
            retry=retry_if_exception_type(RETRIED),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._once(method, path, body)
        raise AssertionError("unreachable")

    async def _once(self, method: str, path: str, body: Any) -> dict[str, Any]:
        try:
            async with self._http().request(
                method, self._bases[next(self._turn)] + path, json=body, headers=self._headers
            ) as response:
                raw = await response.read()
                status = response.status
                retry_after = response.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # str, not repr: a ClientResponseError's repr holds the request's headers
            raise ServiceUnavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        answer = _json(raw)
        if status < 400:
            return answer
        error = answer.get("error")
        if not isinstance(error, dict):
            error = {}
        raised = error_of(
            str(error.get("code", Code.HTTP_ERROR)),
            str(error.get("message", f"{method} {path} answered HTTP {status}")),
            status,
        )
        if isinstance(raised, RateLimited) and retry_after and retry_after.isdigit():
            raised.retry_after = float(retry_after)
        raise raised


class _RetryAfter:
    """A tenacity wait: ``backoff``, but no less than a 429's ``Retry-After``."""

    def __init__(self, backoff: Callable[[RetryCallState], float]) -> None:
        self._backoff = backoff

    def __call__(self, state: RetryCallState) -> float:
        wait = self._backoff(state)
        failure = state.outcome.exception() if state.outcome is not None else None
        if isinstance(failure, RateLimited):
            wait = max(wait, failure.retry_after)
        return wait


def error_of(code: str, message: str, status: int | None = None) -> ReliableMsgError:
    """The error an answer of the service stands for: its code's, when this SDK knows
    the code (and the answer's ``status``, if any, agrees); else its status's. A batch
    item has no status of its own: with a code this SDK does not know, it is taken for
    an outage (503), retried and then left to check-back rather than taken for final."""
    known = _CODES.get(code)
    kind: type[ReliableMsgError]
    if known is not None and status in (None, known.status):
        kind = known.error
    elif status is None or status >= 500:
        kind = ServiceUnavailable
    else:
        kind = _BY_STATUS.get(status, RequestError)
    if kind.status >= 500 and not issubclass(kind, RETRIED):
        kind = ServiceUnavailable  # a fault of the service: all a client can do is retry
    error = kind(message)
    error.code = known if known is not None else code
    return error


def _json(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _items(answer: dict[str, Any]) -> list[ItemResult]:
    results = []
    for item in answer.get("results", []):
        error = item.get("error")
        results.append(
            ItemResult(
                id=item["id"],
                ok=bool(item["ok"]),
                status=item.get("status"),
                created=item.get("created"),
                error=error_of(error["code"], error["message"]) if error else None,
                done_at=datetime.fromisoformat(item["done_at"]) if item.get("done_at") else None,
            )
        )
    return results
