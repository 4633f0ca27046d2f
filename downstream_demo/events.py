"""``order.paid`` as the downstream services read it."""

from __future__ import annotations

from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field

from reliable_msg.sdk.consumer import Received


class OrderPaid(BaseModel):
    """An order was paid: take its stock, credit its points, ship it."""

    model_config = ConfigDict(frozen=True)

    order_id: int
    member_id: int
    sku: str
    qty: int = Field(gt=0)
    amount: Decimal
    points: int = Field(ge=0)

    @classmethod
    def of(cls, message: Received) -> OrderPaid:
        return cls.model_validate(message.payload)
