"""The order service's HTTP API.

``POST /orders`` ``{member_id, sku, qty, amount}``
    201 the order, ``created``.
``GET /orders/{id}``
    200 the order; 404.
``POST /orders/{id}/pay?fail=local&crash=after_commit``
    200 the order, ``paid`` (also when it already was); 404; 409 ``not_payable`` (it
    ``failed``); 500 ``payment_failed`` (the local transaction failed: the order is
    ``failed`` and its message cancelled); 503 the reliable-msg service did not answer.
    The two switches inject the demo's failures (:mod:`upstream_demo.faults`).
``POST /rmsg/check-back``
    the producer SDK's check-back answer, for the service only.
``GET /health``
    200 when the database answers.

Errors are ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Annotated, Literal

import asyncpg
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from reliable_msg.errors import (
    BrokerError,
    Code,
    Conflict,
    ReliableMsgError,
    ServiceUnavailable,
    StoreError,
)
from reliable_msg.sdk.producer import Producer, check_back_router

from . import store
from .faults import CrashingClient, LocalFailure
from .store import Order, OrderStatus

#: The topic a paid order is announced on.
TOPIC = "order.paid"


class OrderError(Exception):
    """An answer other than success, with its HTTP status and error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class NewOrder(BaseModel):
    member_id: int = Field(gt=0)
    sku: str = Field(min_length=1, max_length=64)
    qty: int = Field(gt=0, le=10_000)
    amount: Decimal = Field(ge=0, max_digits=12, decimal_places=2)


class OrderOut(BaseModel):
    id: int
    member_id: int
    sku: str
    qty: int
    amount: Decimal
    points: int
    status: OrderStatus

    @classmethod
    def of(cls, order: Order) -> OrderOut:
        return cls(
            id=order.id,
            member_id=order.member_id,
            sku=order.sku,
            qty=order.qty,
            amount=order.amount,
            points=order.points,
            status=order.status,
        )


def create_app(
    pool: asyncpg.Pool, producer: Producer, client: CrashingClient, token: str
) -> FastAPI:
    """The app over an open pool and producer; its shutdown closes both."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await producer.close()
            await pool.close()

    app = FastAPI(title="order service (reliable-msg demo)", lifespan=lifespan)
    app.include_router(check_back_router(pool, token))
    payments = Payments(pool, producer, client)

    @app.exception_handler(OrderError)
    async def _error(_: Request, exc: OrderError) -> JSONResponse:
        return JSONResponse(
            {"error": {"code": exc.code, "message": exc.message}}, status_code=exc.status
        )

    @app.post("/orders", status_code=201)
    async def create_order(body: NewOrder) -> OrderOut:
        async with pool.acquire() as conn:
            order = await store.create(conn, body.member_id, body.sku, body.qty, body.amount)
        return OrderOut.of(order)

    @app.get("/orders/{order_id}")
    async def get_order(order_id: int) -> OrderOut:
        async with pool.acquire() as conn:
            return OrderOut.of(await _existing(conn, order_id))

    @app.post("/orders/{order_id}/pay")
    async def pay_order(
        order_id: int,
        fail: Annotated[Literal["local"] | None, Query()] = None,
        crash: Annotated[Literal["after_commit"] | None, Query()] = None,
    ) -> OrderOut:
        return OrderOut.of(await payments.pay(order_id, fail=fail, crash=crash))

    @app.get("/health")
    async def health() -> dict[str, str]:
        await pool.fetchval("SELECT 1")
        return {"status": "ok"}

    return app


class Payments:
    """Paying an order: its status and its ``order.paid`` message, all or nothing."""

    def __init__(self, pool: asyncpg.Pool, producer: Producer, client: CrashingClient) -> None:
        self._pool = pool
        self._producer = producer
        self._client = client

    async def pay(self, order_id: int, *, fail: str | None, crash: str | None) -> Order:
        async with self._pool.acquire() as conn:
            order = await _existing(conn, order_id)
            if order.status is OrderStatus.PAID:
                return order
            if order.status is OrderStatus.FAILED:
                raise OrderError(409, "not_payable", f"order {order_id} failed; it cannot be paid")
            if crash == "after_commit":
                self._client.doom(order.message_id)
            try:
                return await self._paid(conn, order, fail)
            except LocalFailure as exc:
                await store.mark_failed(conn, order.id)
                raise OrderError(500, "payment_failed", str(exc)) from exc
            except Conflict as exc:
                if exc.code != Code.MESSAGE_CANCELLED:
                    raise _translated(exc) from exc
                # An earlier attempt rolled back and its message was cancelled: the
                # order's one message id is spent, so the order fails as that attempt did.
                await store.mark_failed(conn, order.id)
                raise OrderError(
                    409, "not_payable", f"order {order_id}'s payment was rolled back earlier"
                ) from exc
            except ReliableMsgError as exc:
                raise _translated(exc) from exc

    async def _paid(self, conn: store.Conn, order: Order, fail: str | None) -> Order:
        async with self._producer.transaction(
            conn, TOPIC, order.paid_event(), id=order.message_id, key=str(order.id)
        ):
            paid = await store.mark_paid(conn, order.id)
            if paid is None:
                raise OrderError(409, "not_payable", f"order {order.id} changed meanwhile")
            if fail == "local":
                raise LocalFailure(f"injected failure of order {order.id}'s local transaction")
        return paid


async def _existing(conn: store.Conn, order_id: int) -> Order:
    order = await store.get(conn, order_id)
    if order is None:
        raise OrderError(404, "not_found", f"no order {order_id}")
    return order


def _translated(exc: ReliableMsgError) -> OrderError:
    if isinstance(exc, ServiceUnavailable | BrokerError | StoreError):
        return OrderError(503, "service_unavailable", f"reliable-msg: {exc.message}")
    return OrderError(409, exc.code, f"reliable-msg: {exc.message}")
