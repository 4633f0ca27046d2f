"""reliable-msg: all-or-nothing delivery between services over RabbitMQ.

The SDKs' public names and their errors, from one place::

    from reliable_msg import Consumer, Producer, ReliableMsgError

An SDK name is imported on first use (see :mod:`reliable_msg.sdk`), so that the service
and the command line, which import this package first, do not load the SDKs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from reliable_msg.errors import (
    BadRequest,
    BrokerError,
    BrokerUnavailable,
    Conflict,
    Fenced,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ReliableMsgError,
    RequestError,
    ServiceUnavailable,
    StoreError,
    Unauthorized,
    Unprocessable,
    Unpublishable,
    Unroutable,
)

if TYPE_CHECKING:
    from reliable_msg.sdk import (
        Consumer,
        ItemResult,
        Outgoing,
        Producer,
        Received,
        RetryPolicy,
        Sent,
        ServiceClient,
        check_back_router,
        purge_inbox,
        purge_markers,
    )

__version__ = "0.1.0"

__all__ = [
    "BadRequest",
    "BrokerError",
    "BrokerUnavailable",
    "Conflict",
    "Consumer",
    "Fenced",
    "Forbidden",
    "ItemResult",
    "NotFound",
    "Outgoing",
    "PayloadTooLarge",
    "Producer",
    "RateLimited",
    "Received",
    "ReliableMsgError",
    "RequestError",
    "RetryPolicy",
    "Sent",
    "ServiceClient",
    "ServiceUnavailable",
    "StoreError",
    "Unauthorized",
    "Unprocessable",
    "Unpublishable",
    "Unroutable",
    "check_back_router",
    "purge_inbox",
    "purge_markers",
]


def __getattr__(name: str) -> Any:
    # import_module, not "from reliable_msg import sdk", which would ask this function.
    sdk = importlib.import_module("reliable_msg.sdk")
    if name not in sdk.HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(sdk, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
