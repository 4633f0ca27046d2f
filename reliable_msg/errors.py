"""The one exception tree of reliable-msg.

    ReliableMsgError
    ├── ConfigError                 configuration missing or invalid
    ├── RequestError                the caller asked for something wrong (HTTP 4xx)
    │   ├── BadRequest              400 malformed input
    │   ├── Unauthorized            401 no token or an unknown token
    │   ├── Forbidden               403 a token acting on what it does not own
    │   ├── NotFound                404 unknown message or delivery
    │   ├── Conflict                409 id reused with another body, or a move the
    │   │                               state machine forbids
    │   ├── PayloadTooLarge         413 body or payload over the limit
    │   ├── Unprocessable           422 well-formed but unusable (no subscriber, ...)
    │   └── RateLimited             429 a credential over its rate limit
    ├── BrokerError                 RabbitMQ did not take a message (HTTP 503)
    │   ├── BrokerUnavailable       no connection, a timeout or a negative confirm
    │   ├── Unroutable              the broker returned the message: no queue bound
    │   └── Unpublishable           the message can never be published (HTTP 422): its
    │                               AMQP header does not fit in a frame, or cannot be
    │                               encoded
    ├── StoreError                  PostgreSQL failed (HTTP 503)
    ├── FallbackUnavailable         Redis (the fallback shards or the switch) failed
    ├── CheckBackError              a producer's check-back endpoint gave no usable answer
    ├── ServiceUnavailable          (SDK) the service did not answer, or answered 5xx,
    │                               after the retries
    └── Fenced                      (SDK) a check-back decided "rolled back" before the
                                    producer's transaction could commit

Third-party errors (asyncpg, aiormq, aiohttp) are translated where they are caught and
chained with ``from exc``.
"""

from __future__ import annotations

from typing import ClassVar


class ReliableMsgError(Exception):
    """Base of every error raised by reliable-msg."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code  # type: ignore[misc]


class ConfigError(ReliableMsgError):
    code = "config"


class RequestError(ReliableMsgError):
    status = 400
    code = "bad_request"


class BadRequest(RequestError):
    pass


class Unauthorized(RequestError):
    status = 401
    code = "unauthorized"


class Forbidden(RequestError):
    status = 403
    code = "forbidden"


class NotFound(RequestError):
    status = 404
    code = "not_found"


class Conflict(RequestError):
    status = 409
    code = "conflict"


class PayloadTooLarge(RequestError):
    status = 413
    code = "payload_too_large"


class Unprocessable(RequestError):
    status = 422
    code = "unprocessable"


class RateLimited(RequestError):
    status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: float = 1.0, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after  #: seconds until a request would be taken


class BrokerError(ReliableMsgError):
    status = 503
    code = "broker_unavailable"


class BrokerUnavailable(BrokerError):
    pass


class Unroutable(BrokerError):
    code = "unroutable"


class Unpublishable(BrokerError):
    """Not an outage and not worth a retry: the message itself cannot go on AMQP."""

    status = 422
    code = "unpublishable"


class StoreError(ReliableMsgError):
    status = 503
    code = "store_unavailable"


class FallbackUnavailable(ReliableMsgError):
    """Redis did not answer: raised by the transports for any Redis failure, chained."""

    status = 503
    code = "fallback_unavailable"


class CheckBackError(ReliableMsgError):
    status = 502
    code = "check_back_failed"


class ServiceUnavailable(ReliableMsgError):
    status = 503
    code = "service_unavailable"


class Fenced(ReliableMsgError):
    status = 409
    code = "fenced"


#: The error an SDK raises for an HTTP status of the service, when no code is closer.
BY_STATUS: dict[int, type[ReliableMsgError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: Unprocessable,
    429: RateLimited,
}

#: The error an SDK raises for an error code of the service.
BY_CODE: dict[str, type[ReliableMsgError]] = {
    BrokerError.code: BrokerUnavailable,
    Unroutable.code: Unroutable,
    StoreError.code: StoreError,
}


#: Every error code the service answers, with the error it stands for. A batch answers
#: HTTP 200 and gives a failed item only its code: its status comes from here, so that the
#: SDK raises the same error for an item as for a single call (a unit test checks every
#: code raised in reliable_msg against this table).
CODES: dict[str, type[ReliableMsgError]] = {
    **{code: BadRequest for code in (RequestError.code, "invalid_json", "bad_cursor")},
    Unauthorized.code: Unauthorized,
    Forbidden.code: Forbidden,
    NotFound.code: NotFound,
    **{
        code: Conflict
        for code in (
            Conflict.code,
            "id_conflict",
            "id_reused",
            "cancelled",
            "already_sent",
            "dead",
            "not_dead",
            "delivery_dead",
            "not_sent",
            "busy",
            "duplicate_transaction",
            "message_cancelled",
        )
    },
    Fenced.code: Fenced,
    PayloadTooLarge.code: PayloadTooLarge,
    "headers_too_large": PayloadTooLarge,
    **{
        code: Unprocessable
        for code in (
            Unprocessable.code,
            "no_subscriber",
            "unencodable",
            "unknown_group",
            "duplicate_id",
            "invalid_request",
        )
    },
    Unpublishable.code: Unpublishable,
    RateLimited.code: RateLimited,
    BrokerError.code: BrokerUnavailable,
    Unroutable.code: Unroutable,
    StoreError.code: StoreError,
    FallbackUnavailable.code: FallbackUnavailable,
    CheckBackError.code: CheckBackError,
    ServiceUnavailable.code: ServiceUnavailable,
    ConfigError.code: ConfigError,
    ReliableMsgError.code: ReliableMsgError,
}


def status_of(code: str) -> int:
    """The HTTP status an error code stands for (503 for a code this version does not
    know: retried, then left to check-back, rather than taken for final)."""
    kind = CODES.get(code)
    return kind.status if kind is not None else 503


def from_response(status: int, code: str, message: str) -> ReliableMsgError:
    """The exception matching an error answer of the service."""
    kind = BY_CODE.get(code) or BY_STATUS.get(status)
    if kind is None:
        kind = ServiceUnavailable if status >= 500 else RequestError
    return kind(message, code=code)
