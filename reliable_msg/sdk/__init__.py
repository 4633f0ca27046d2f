"""The SDKs, which run inside the users' processes: the producer (a local transaction and
its message, all or nothing), the consumer (one effect per message and group), the TCC
initiator and participant (one global transaction over synchronous calls, all or
nothing) and the HTTP client of the service they share.

::

    from reliable_msg.sdk import Consumer, Initiator, Participant, Producer

Each SDK name is imported from its module on first use, so that a producer does not load
the consumer's RabbitMQ and Redis clients. The tables' ``install`` functions keep their
modules' names: ``reliable_msg.sdk.producer.install``, ``reliable_msg.sdk.consumer.install``,
``reliable_msg.sdk.tcc.install``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from reliable_msg.errors import (
    BadRequest,
    BrokerError,
    BrokerUnavailable,
    Code,
    Conflict,
    FallbackUnavailable,
    Fenced,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    Refused,
    ReliableMsgError,
    RequestError,
    ServiceUnavailable,
    StoreError,
    TryFailed,
    TryRefused,
    Unauthorized,
    Unprocessable,
    Unpublishable,
    Unroutable,
)

if TYPE_CHECKING:
    from reliable_msg.sdk.client import ItemResult, RetryPolicy, ServiceClient
    from reliable_msg.sdk.confirms import ConfirmBatching
    from reliable_msg.sdk.consumer import Consumer, Poison, Received, purge_inbox
    from reliable_msg.sdk.producer import (
        Outgoing,
        Producer,
        Sent,
        check_back_router,
        purge_markers,
    )
    from reliable_msg.sdk.tcc import (
        Branch,
        Call,
        GlobalTransaction,
        Initiator,
        Participant,
        purge_barriers,
    )

#: The module of each SDK name, imported on first use.
HOMES = {
    "ItemResult": "client",
    "RetryPolicy": "client",
    "ServiceClient": "client",
    "Consumer": "consumer",
    "Poison": "consumer",
    "Received": "consumer",
    "purge_inbox": "consumer",
    "ConfirmBatching": "confirms",
    "Outgoing": "producer",
    "Producer": "producer",
    "Sent": "producer",
    "check_back_router": "producer",
    "purge_markers": "producer",
    "Branch": "tcc",
    "Call": "tcc",
    "GlobalTransaction": "tcc",
    "Initiator": "tcc",
    "Participant": "tcc",
    "purge_barriers": "tcc",
}

__all__ = [
    "BadRequest",
    "Branch",
    "BrokerError",
    "BrokerUnavailable",
    "Call",
    "Code",
    "ConfirmBatching",
    "Conflict",
    "Consumer",
    "FallbackUnavailable",
    "Fenced",
    "Forbidden",
    "GlobalTransaction",
    "Initiator",
    "ItemResult",
    "MethodNotAllowed",
    "NotFound",
    "Outgoing",
    "Participant",
    "PayloadTooLarge",
    "Poison",
    "Producer",
    "RateLimited",
    "Received",
    "Refused",
    "ReliableMsgError",
    "RequestError",
    "RetryPolicy",
    "Sent",
    "ServiceClient",
    "ServiceUnavailable",
    "StoreError",
    "TryFailed",
    "TryRefused",
    "Unauthorized",
    "Unprocessable",
    "Unpublishable",
    "Unroutable",
    "check_back_router",
    "purge_barriers",
    "purge_inbox",
    "purge_markers",
]


def __getattr__(name: str) -> Any:
    home = HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # the next lookup does not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
