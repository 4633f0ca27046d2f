"""The pool the store's parts share, and the boundary where asyncpg's errors become
:class:`~reliable_msg.errors.StoreError` (chained with ``from exc``)."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, ParamSpec, Self, TypeVar

import asyncpg
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
)

from reliable_msg.errors import StoreError

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

#: PostgreSQL errors worth one more try of the same short transaction.
RETRYABLE = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
#: What says PostgreSQL is out of reach rather than that we sent bad SQL.
UNAVAILABLE = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.AdminShutdownError,
    asyncpg.TooManyConnectionsError,
    asyncpg.QueryCanceledError,
    # A pooled connection the server terminated while it sat idle, picked up before its
    # end of stream was read: "cannot switch to state ...; another operation is in
    # progress". The connection is closed right after; the next call gets a new one.
    asyncpg.InternalClientError,
    TimeoutError,
)

#: A connection from the pool (asyncpg hands out proxies).
Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


def translated(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Turn a lost database into :class:`StoreError`; retry deadlocks a few times."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        for attempt in range(1, 4):
            try:
                return await fn(*args, **kwargs)
            except RETRYABLE:
                if attempt == 3:
                    raise
                log.debug("retrying %s after a deadlock", fn.__name__)
            except UNAVAILABLE as exc:
                raise StoreError(f"PostgreSQL unavailable: {exc}") from exc
        raise AssertionError("unreachable")

    return wrapper


class Pooled:
    """The asyncpg pool every part of the store works through."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def connect(cls, dsn: str, *, pool_size: int = 20, wait: float = 0.0) -> Self:
        """Open the pool; with ``wait``, keep trying that long while PostgreSQL does not
        answer (a server restarting, or starting with the service)."""
        retrying = AsyncRetrying(
            retry=retry_if_exception(_unreachable),
            stop=stop_after_delay(wait),
            wait=wait_exponential(multiplier=0.2, max=2.0),
            before_sleep=_log_waiting,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await cls._connect(dsn, pool_size)
        raise AssertionError("unreachable")

    @classmethod
    async def _connect(cls, dsn: str, pool_size: int) -> Self:
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min(2, pool_size),
                max_size=pool_size,
                reset=_keep_session,
                server_settings={
                    "application_name": "reliable-msg",
                    "statement_timeout": "30s",
                    "idle_in_transaction_session_timeout": "60s",
                },
            )
        except (*UNAVAILABLE, asyncpg.PostgresError) as exc:
            raise StoreError(f"cannot connect to PostgreSQL: {exc}") from exc
        return cls(pool)

    @property
    def pool(self) -> asyncpg.Pool:
        """The pool itself, for another store over the same database (the TCC
        coordinator's) to share rather than open its own."""
        return self._pool

    async def close(self) -> None:
        await self._pool.close()

    async def _delete_in_batches(
        self, sql: str, older_than: float, batch: int, *args: object
    ) -> int:
        """Run ``sql`` (``$1`` the age in seconds, ``$2`` the batch size) until it deletes
        fewer than ``batch`` rows; short transactions, so the hot tables never wait long."""
        total = 0
        while True:
            result = await self._pool.execute(sql, older_than, batch, *args)
            deleted = int(result.split()[-1])
            total += deleted
            if deleted < batch:
                return total

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[Conn]:
        async with self._pool.acquire() as conn, conn.transaction():
            yield conn

    @translated
    async def ping(self) -> None:
        async with self._pool.acquire() as conn:
            await conn.fetchval("SELECT 1")


def _unreachable(exc: BaseException) -> bool:
    """A connect that failed because the server is not there (yet), not because it said
    no (bad credentials, no such database)."""
    cause = exc.__cause__
    return isinstance(exc, StoreError) and isinstance(
        cause, (OSError, TimeoutError, asyncpg.CannotConnectNowError)
    )


def _log_waiting(state: RetryCallState) -> None:
    log.warning(
        "PostgreSQL does not answer (%s); trying again",
        state.outcome.exception() if state.outcome else "?",
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to reset when a connection goes back to the pool: the service sets no
    session state (asyncpg's default reset is a round trip per release; an open
    transaction is still rolled back before this runs)."""
