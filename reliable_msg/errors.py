"""The one exception tree of reliable-msg, and the error codes of the HTTP API.

    ReliableMsgError                500 a bug (``internal``)
    ├── ConfigError                 configuration missing or invalid
    ├── IllegalTransition           (states) a move the state machine forbids: a bug
    ├── RequestError                the caller asked for something wrong (HTTP 4xx)
    │   ├── BadRequest              400 malformed input
    │   ├── Unauthorized            401 no token or an unknown token
    │   ├── Forbidden               403 a token acting on what it does not own
    │   ├── NotFound                404 unknown message or delivery
    │   ├── MethodNotAllowed        405 a path that does not take this method
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
    ├── Fenced                      (SDK) a check-back decided "rolled back" before the
    │                               producer's transaction could commit
    ├── Refused                     (TCC participant SDK, HTTP 409) a Try's business
    │   │                           refusal: out of stock, say
    │   └── TryRefused              (TCC initiator SDK) a participant answered a Try 409:
    │                               the global transaction is cancelled
    ├── TryFailed                   (TCC initiator SDK) a Try got no answer, or neither
    │                               200 nor 409: the global transaction is cancelled
    ├── Poison                      (SDK, also a ValueError) a delivery no handler can
    │                               ever take: no id, not JSON, no handler for its topic
    └── NotReady                    (harness) a process the tools started never got ready

Every error carries a :class:`Code`: the string the API answers, which names the HTTP
status and the error class it stands for, so that the service raises and the SDK client
re-raises the same error for it. Third-party errors (asyncpg, aiormq, redis, aiohttp) are
translated where they are caught and chained with ``from exc``; :data:`TRANSIENT` names
which of ours mean an outage rather than a refusal.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar


class ReliableMsgError(Exception):
    """Base of every error raised by reliable-msg."""

    status: ClassVar[int] = 500
    #: What the API answers for this error: its class's own code (below) unless raised
    #: with another of its class's codes. A plain ``str`` only in an SDK, for a code of a
    #: newer service that the SDK does not know.
    code: Code | str

    def __init__(self, message: str, *, code: Code | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ConfigError(ReliableMsgError):
    pass


class RequestError(ReliableMsgError):
    status = 400


class BadRequest(RequestError):
    pass


class Unauthorized(RequestError):
    status = 401


class Forbidden(RequestError):
    status = 403


class NotFound(RequestError):
    status = 404


class MethodNotAllowed(RequestError):
    status = 405


class Conflict(RequestError):
    status = 409


class PayloadTooLarge(RequestError):
    status = 413


class Unprocessable(RequestError):
    status = 422


class RateLimited(RequestError):
    status = 429

    def __init__(self, message: str, *, retry_after: float = 1.0, code: Code | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after  #: seconds until a request would be taken


class BrokerError(ReliableMsgError):
    status = 503


class BrokerUnavailable(BrokerError):
    pass


class Unroutable(BrokerError):
    pass


class Unpublishable(BrokerError):
    """Not an outage and not worth a retry: the message itself cannot go on AMQP."""

    status = 422


class StoreError(ReliableMsgError):
    status = 503


class FallbackUnavailable(ReliableMsgError):
    """Redis did not answer: raised by the transports for any Redis failure, chained."""

    status = 503


class CheckBackError(ReliableMsgError):
    status = 502


class ServiceUnavailable(ReliableMsgError):
    status = 503


class Fenced(ReliableMsgError):
    status = 409


class Refused(ReliableMsgError):
    """Raised by a TCC participant's Try handler to refuse the call for a business reason
    (out of stock, say): its transaction rolls back and the call is answered 409, so that
    the initiator cancels the global transaction."""

    status = 409


class TryRefused(Refused):
    """A participant refused a branch's Try (it answered 409): the initiator SDK cancels
    the global transaction and raises this from its block, carrying the branch and the
    participant's error answer (``{"code", "message"}``, its code ``refused`` or
    ``cancelled_before_try``)."""

    def __init__(
        self,
        message: str,
        *,
        participant: str = "",
        branch: str = "",
        answer: dict[str, Any] | None = None,
        code: Code | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.participant = participant
        self.branch = branch
        self.answer: dict[str, Any] = answer or {}


class TryFailed(ReliableMsgError):
    """A branch's Try failed otherwise than by a refusal: no answer in time, or an answer
    neither 2xx nor 409. The Try may have run; the Cancel the initiator SDK then asks for
    gives it back (or is recorded as an empty rollback, and the late Try refused)."""

    status = 502

    def __init__(
        self,
        message: str,
        *,
        participant: str = "",
        branch: str = "",
        http_status: int | None = None,
        answer: dict[str, Any] | None = None,
        code: Code | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.participant = participant
        self.branch = branch
        #: the participant's HTTP status; None when it gave no answer
        self.http_status = http_status
        self.answer: dict[str, Any] = answer or {}


class Code(StrEnum):
    """Every error code: the string on the wire, and the error it stands for, whose
    HTTP status it answers with. A batch answers HTTP 200 and gives a failed item only
    its code, so an item raises the same error in the SDK as a single call."""

    error: type[ReliableMsgError]

    def __new__(cls, value: str, error: type[ReliableMsgError]) -> Code:
        member = str.__new__(cls, value)
        member._value_ = value
        member.error = error
        return member

    @property
    def status(self) -> int:
        """The HTTP status the service answers with this code."""
        return self.error.status

    INTERNAL = "internal", ReliableMsgError  #: a bug; the service's log says more
    CONFIG = "config", ConfigError  #: configuration missing or invalid
    BAD_REQUEST = "bad_request", BadRequest  #: malformed input
    INVALID_JSON = "invalid_json", BadRequest  #: the body is not JSON
    BAD_CURSOR = "bad_cursor", BadRequest  #: a list cursor this service did not hand out
    UNAUTHORIZED = "unauthorized", Unauthorized  #: no token, an unknown one, or two
    FORBIDDEN = "forbidden", Forbidden  #: a token of another role, or another producer's
    NOT_FOUND = "not_found", NotFound  #: no such message, delivery or path
    METHOD_NOT_ALLOWED = "method_not_allowed", MethodNotAllowed  #: see the Allow header
    #: another error the HTTP framework answers, with its own status
    HTTP_ERROR = "http_error", BadRequest
    CONFLICT = "conflict", Conflict  #: a move the state machine forbids
    ID_CONFLICT = "id_conflict", Conflict  #: the id exists with another body or producer
    ID_REUSED = "id_reused", Conflict  #: the id's message was purged; ids are never reused
    CANCELLED = "cancelled", Conflict  #: confirm of a cancelled message
    ALREADY_SENT = "already_sent", Conflict  #: cancel of a message already sent
    DEAD = "dead", Conflict  #: the message died (check-back exhausted, or refused for good)
    NOT_DEAD = "not_dead", Conflict  #: requeue of a message that is not dead
    DELIVERY_DEAD = "delivery_dead", Conflict  #: ack of a dead delivery
    NOT_SENT = "not_sent", Conflict  #: ack of a message not confirmed yet: ack again
    BUSY = "busy", Conflict  #: ack while the delivery is being moved: ack again
    #: (SDK) the message was already committed by another local transaction
    DUPLICATE_TRANSACTION = "duplicate_transaction", Conflict
    #: (SDK) an earlier transaction with this id rolled back: use a new id
    MESSAGE_CANCELLED = "message_cancelled", Conflict
    #: (SDK) a check-back decided "rolled back" before the transaction could commit
    FENCED = "fenced", Fenced
    #: (TCC participant) a Try's business refusal, raised by its handler
    REFUSED = "refused", Refused
    #: (TCC participant) a Try that arrives after its branch's Cancel: refused, no effect
    CANCELLED_BEFORE_TRY = "cancelled_before_try", Conflict
    #: (TCC initiator SDK) a participant refused a Try (409): the transaction is cancelled
    TRY_REFUSED = "try_refused", TryRefused
    #: (TCC initiator SDK) a Try got no answer, or a failure: the transaction is cancelled
    TRY_FAILED = "try_failed", TryFailed
    #: (TCC) register or commit of a transaction that is no longer ``trying``
    NOT_TRYING = "not_trying", Conflict
    #: (TCC) commit or register past the transaction's deadline: it is being cancelled
    EXPIRED = "expired", Conflict
    #: (TCC) cancel of a transaction already committed (confirming or confirmed)
    COMMITTED = "committed", Conflict
    #: (TCC) commit of a transaction already cancelled (cancelling or cancelled)
    ROLLED_BACK = "rolled_back", Conflict
    #: (TCC) a branch names no ``[participants.<name>]`` of the configuration
    UNKNOWN_PARTICIPANT = "unknown_participant", Unprocessable
    #: (TCC) more branches than ``tcc.max_branches`` in one transaction
    TOO_MANY_BRANCHES = "too_many_branches", Unprocessable
    PAYLOAD_TOO_LARGE = "payload_too_large", PayloadTooLarge  #: request body or payload
    #: the AMQP properties and headers over ``max_header_bytes``
    HEADERS_TOO_LARGE = "headers_too_large", PayloadTooLarge
    UNPROCESSABLE = "unprocessable", Unprocessable  #: well-formed but unusable
    NO_SUBSCRIBER = "no_subscriber", Unprocessable  #: no consumer group takes the topic
    UNENCODABLE = "unencodable", Unprocessable  #: the headers cannot be encoded for AMQP
    UNKNOWN_GROUP = "unknown_group", Unprocessable  #: no consumer group of that name
    DUPLICATE_ID = "duplicate_id", Unprocessable  #: a batch names the same id twice
    INVALID_REQUEST = "invalid_request", Unprocessable  #: a body or parameter is invalid
    #: a delivery can never be published (its header over ``frame_max``)
    UNPUBLISHABLE = "unpublishable", Unpublishable
    RATE_LIMITED = "rate_limited", RateLimited  #: over the rate limit: see Retry-After
    BROKER_UNAVAILABLE = "broker_unavailable", BrokerUnavailable  #: RabbitMQ is out
    UNROUTABLE = "unroutable", Unroutable  #: no queue took the message
    STORE_UNAVAILABLE = "store_unavailable", StoreError  #: PostgreSQL is out
    FALLBACK_UNAVAILABLE = "fallback_unavailable", FallbackUnavailable  #: Redis is out
    #: a producer's check-back endpoint gave no usable answer
    CHECK_BACK_FAILED = "check_back_failed", CheckBackError
    SERVICE_UNAVAILABLE = "service_unavailable", ServiceUnavailable  #: (SDK) after retries


# Each class's own code: the one it carries when raised without ``code=``.
ReliableMsgError.code = Code.INTERNAL
ConfigError.code = Code.CONFIG
RequestError.code = Code.BAD_REQUEST
Unauthorized.code = Code.UNAUTHORIZED
Forbidden.code = Code.FORBIDDEN
NotFound.code = Code.NOT_FOUND
MethodNotAllowed.code = Code.METHOD_NOT_ALLOWED
Conflict.code = Code.CONFLICT
PayloadTooLarge.code = Code.PAYLOAD_TOO_LARGE
Unprocessable.code = Code.UNPROCESSABLE
RateLimited.code = Code.RATE_LIMITED
BrokerError.code = Code.BROKER_UNAVAILABLE
Unroutable.code = Code.UNROUTABLE
Unpublishable.code = Code.UNPUBLISHABLE
StoreError.code = Code.STORE_UNAVAILABLE
FallbackUnavailable.code = Code.FALLBACK_UNAVAILABLE
CheckBackError.code = Code.CHECK_BACK_FAILED
ServiceUnavailable.code = Code.SERVICE_UNAVAILABLE
Fenced.code = Code.FENCED
Refused.code = Code.REFUSED
TryRefused.code = Code.TRY_REFUSED
TryFailed.code = Code.TRY_FAILED

#: Our errors that mean an outage rather than a refusal: the same call may succeed later.
#: (The third-party errors behind them stay private to the adapter that translates them.)
TRANSIENT: tuple[type[ReliableMsgError], ...] = (
    BrokerUnavailable,
    StoreError,
    FallbackUnavailable,
    ServiceUnavailable,
)
