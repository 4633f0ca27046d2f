"""The sections of the settings: each a frozen model of one table of the TOML file
(``[checkback]``, ``[producers.<name>]``...), gathered by
:class:`reliable_msg.service.settings.Settings`."""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from reliable_msg import constants
from reliable_msg.policy import PATTERN_RE
from reliable_msg.tcc import Op

Seconds = Annotated[float, Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProducerSettings(_Section):
    """An upstream service allowed to prepare messages."""

    check_url: AnyHttpUrl
    token: SecretStr | None = None


class ParticipantSettings(_Section):
    """A TCC participant: the coordinator calls ``<url>/confirm`` and ``<url>/cancel``
    (the initiator ``<url>/try``), and no URL a request names."""

    url: AnyHttpUrl
    #: the key of the calls' proofs (:func:`reliable_msg.tcc.proof`); required, given
    #: like a producer's token (``RMSG_PARTICIPANTS__<NAME>__TOKEN``)
    token: SecretStr
    #: one call to this participant, connect to last byte; unset: ``tcc.call_timeout``
    timeout: Seconds | None = None

    @field_validator("url")
    @classmethod
    def _plain(cls, url: AnyHttpUrl) -> AnyHttpUrl:
        if url.username is not None or url.password is not None:
            raise ValueError("must not carry credentials (the token authenticates the calls)")
        if url.query is not None:
            raise ValueError("must not have a query (?...)")
        if url.fragment is not None:
            raise ValueError("must not have a fragment (#...)")
        return url

    def op_url(self, op: Op) -> str:
        """Where this participant takes ``op``: ``<url>/try``, ``/confirm`` or ``/cancel``."""
        return f"{str(self.url).rstrip('/')}/{op.value}"


class TccSettings(_Section):
    """The TCC coordinator (issue 13: the coordinator itself is coming)."""

    call_timeout: Seconds = 10.0  #: one Confirm or Cancel call, unless the participant says
    #: wait after a branch's first failed Confirm or Cancel; doubled after each one
    backoff_base: Seconds = 1.0
    backoff_cap: Seconds = 300.0  #: the longest wait between two calls of a branch
    jitter: float = Field(default=0.2, ge=0.0, lt=1.0)  #: each wait drawn within ± this share
    #: a transaction still confirming or cancelling this long after its commit or cancel
    #: is flagged stalled (a metric, a WARNING with the gid); it is still retried
    stalled_after: Seconds = 600.0
    #: how long a claimed transaction is hidden from other instances: its calls must end
    #: well within it
    lease: Seconds = 30.0
    max_timeout: Seconds = 3600.0  #: the longest timeout a begin may ask for
    max_branches: int = Field(default=32, ge=1)  #: branches one transaction may have
    max_payload_bytes: int = Field(default=64 * 1024, ge=1)  #: one branch's payload, as JSON
    retention: Seconds = 7 * 24 * 3600.0  #: confirmed and cancelled transactions kept this long

    @model_validator(mode="after")
    def _consistent(self) -> TccSettings:
        if self.backoff_cap < self.backoff_base:
            raise ValueError(
                f"tcc.backoff_cap ({self.backoff_cap:g} s) must be at least tcc.backoff_base "
                f"({self.backoff_base:g} s)"
            )
        if self.lease <= self.call_timeout:
            raise ValueError(
                f"tcc.lease ({self.lease:g} s) must be longer than tcc.call_timeout "
                f"({self.call_timeout:g} s): a transaction would be claimed again while its "
                "calls are still in flight"
            )
        return self


class GroupSettings(_Section):
    """A downstream consumer group: one durable queue bound to its topics."""

    topics: list[str] = Field(min_length=1)
    token: SecretStr | None = None
    queue: str | None = None
    max_attempts: int | None = Field(default=None, ge=1)
    shards: int | None = Field(default=None, ge=1, le=16384)  #: fallback shards of this group

    @field_validator("topics")
    @classmethod
    def _patterns(cls, topics: list[str]) -> list[str]:
        bad = [t for t in topics if not PATTERN_RE.fullmatch(t)]
        if bad:
            raise ValueError(f"not a topic pattern: {', '.join(bad)}")
        return topics


class GroupCommitSettings(_Section):
    """Group commit of the API's prepares, confirms and acks: concurrent calls share one
    statement, one transaction and one batch of publishes, each still answered on its
    own (:mod:`reliable_msg.coalesce`)."""

    enabled: bool = True
    #: the longest a call waits for others to join its batch, in seconds (0: only the
    #: calls that arrive while every running batch is busy join)
    window: float = Field(default=0.002, ge=0.0, le=1.0)
    #: the most messages one shared batch holds; a call of more runs on its own
    max_items: int = Field(default=500, ge=1, le=10_000)
    #: batches of each kind (prepare, confirm, ack) running at once
    max_running: int = Field(default=4, ge=1, le=64)


class CheckBackSettings(_Section):
    after: Seconds = 10.0  #: a pending message is checked back this long after prepare
    max_tries: int = Field(default=15, ge=1)  #: then it is dead
    backoff_base: Seconds = 5.0
    backoff_factor: float = Field(default=2.0, ge=1.0)
    backoff_cap: Seconds = 600.0
    timeout: Seconds = 5.0  #: one check-back HTTP call, connect to last byte
    concurrency: int = Field(default=32, ge=1)  #: check-back calls in flight per instance
    #: calls in flight per instance to any one producer (at most ``concurrency``), so that
    #: one producer's stalled endpoint cannot take every slot
    per_producer: int = Field(default=8, ge=1)
    #: how long a claimed message is hidden from other instances and passes: its call
    #: must end well within it
    lease: Seconds = 60.0

    @model_validator(mode="after")
    def _lease_outlasts_call(self) -> CheckBackSettings:
        if self.lease <= self.timeout:
            raise ValueError(
                f"checkback.lease ({self.lease:g} s) must be longer than checkback.timeout "
                f"({self.timeout:g} s): a message would be claimed and asked again while "
                "its first call is still in flight"
            )
        return self


class RedeliverySettings(_Section):
    ack_timeout: Seconds = 30.0  #: a delivery not acked this long after publish is resent
    #: wait after the first redelivery; each later one waits ``backoff_factor`` times more
    backoff_base: Seconds | None = None  # None: ack_timeout
    backoff_factor: float = Field(default=2.0, ge=1.0)
    backoff_cap: Seconds = 3600.0
    jitter: float = Field(default=0.2, ge=0.0, lt=1.0)
    max_attempts: int = Field(default=16, ge=1)  #: then the delivery is dead
    retry_after_failure: Seconds = 5.0  #: when the broker refused a redelivery


class FallbackSettings(_Section):
    """Degradation to Redis while RabbitMQ is down (README: When RabbitMQ is down)."""

    enabled: bool = True
    namespace: str = Field(default=constants.REDIS_NAMESPACE, pattern=r"^[A-Za-z0-9_.\-]+$")
    failure_threshold: int = Field(default=10, ge=1)  #: consecutive failed publishes trip it
    shards: int = Field(default=128, ge=1, le=16384)  #: streams per group, unless the group says
    poll_interval: Seconds = 1.0  #: every instance re-reads the switch this often
    probe_interval: Seconds = 2.0  #: while degraded, a probe publish is tried this often
    shard_alarm: int = Field(default=10_000, ge=1)  #: a shard longer than this is alarmed


class ScannerSettings(_Section):
    enabled: bool = True
    interval: Seconds = 1.0  #: seconds between passes of each scanner
    batch: int = Field(default=500, ge=1, le=10_000)  #: rows claimed per round trip
    purge_interval: Seconds = 3600.0
    retention: Seconds = 7 * 24 * 3600.0  #: done and cancelled messages kept this long
    #: ids of purged messages refused this long after their prepare, then free again, and
    #: gids of purged TCC transactions this long after their purge; None keeps them for
    #: ever (see README, "Guarantees")
    id_retention: Seconds | None = None

    @model_validator(mode="after")
    def _ids_outlive_messages(self) -> ScannerSettings:
        if self.id_retention is not None and self.id_retention < self.retention:
            raise ValueError(
                f"scanner.id_retention ({self.id_retention}) must be at least"
                f" scanner.retention ({self.retention}): an id is refused while its"
                " message is stored"
            )
        return self


class MonitorSettings(_Section):
    """Samples for the dashboard's chart and the gauges of ``/metrics`` (README: HTTP API)."""

    interval: Seconds = 5.0  #: seconds between samples of the rates and the scanner lag
    #: seconds between counts of messages per status and deliveries per group: each is a
    #: full count of the tables, so keep it slow when they are big
    counts_interval: Seconds = 15.0
    samples: int = Field(default=720, ge=2, le=100_000)  #: samples kept for the chart


class DashboardSettings(_Section):
    """The operators' web dashboard at ``/dashboard`` (admin token login)."""

    enabled: bool = True
    session_ttl: Seconds = 12 * 3600.0  #: seconds a login lasts
    #: failed logins one client address may make in a row, per instance; then one more
    #: every ``login_interval`` seconds (a correct token from another address is not held)
    login_failures: int = Field(default=5, ge=1)
    login_interval: Seconds = 30.0


class LimitSettings(_Section):
    """The API's rate limit per credential: a producer, a consumer group, the admin, or,
    for a request without a valid token, the client's address. Off by default."""

    rate: float = Field(default=0.0, ge=0.0)  #: requests a second per credential; 0: no limit
    #: requests a credential may send at once after a quiet spell; unset: one second's
    #: worth (``rate``, at least 1)
    burst: int | None = Field(default=None, ge=1)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    @property
    def bucket(self) -> int:
        """The burst in force."""
        return self.burst if self.burst is not None else max(1, math.ceil(self.rate))
