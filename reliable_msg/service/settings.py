"""Typed settings: one TOML file plus ``RMSG_*`` environment variables (env wins).

Nested values use ``__`` in variable names: ``RMSG_PRODUCERS__ORDER__TOKEN`` sets the
token of producer ``order``, ``RMSG_PARTICIPANTS__INVENTORY__TOKEN`` that of TCC
participant ``inventory``; ``RMSG_REDELIVERY__MAX_ATTEMPTS`` a scanner setting.
"""

from __future__ import annotations

import math
import os
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from reliable_msg import constants
from reliable_msg.errors import ConfigError
from reliable_msg.policy import NAME_RE, PATTERN_RE, topic_matches
from reliable_msg.tcc import Op
from reliable_msg.transports.nodes import amqp_nodes
from reliable_msg.transports.redis_client import check_redis_url

#: Environment variable naming the TOML file when no ``--config`` is given.
CONFIG_ENV = "RMSG_CONFIG"

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


class Settings(BaseSettings):
    """Everything the service reads at start-up."""

    model_config = SettingsConfigDict(
        env_prefix="RMSG_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    database_url: str = "postgresql://postgres@127.0.0.1:5432/reliable_msg"
    #: one RabbitMQ node, or the nodes of one cluster: a TOML list of URLs or one string
    #: of them separated by commas (``RMSG_AMQP_URL``); stored in the comma form, read
    #: as a list from :attr:`amqp_urls`
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    #: one Redis (``redis://host:port/db``) or a Redis Cluster by its nodes
    #: (``redis+cluster://[user:password@]host:port,host:port...``; README: Running on clusters)
    redis_url: str = "redis://127.0.0.1:6379/0"
    admin_token: SecretStr | None = None

    host: str = "127.0.0.1"
    port: int = Field(default=8470, ge=0, le=65535)
    db_pool_size: int = Field(default=20, ge=2)

    exchange: str = constants.EXCHANGE
    dead_letter_exchange: str = constants.DEAD_LETTER_EXCHANGE
    queue_prefix: str = constants.QUEUE_PREFIX
    queue_type: Literal["quorum", "classic"] = "quorum"  #: type of each group's queues
    publish_timeout: Seconds = 5.0
    #: refusals by a RabbitMQ that is up (no queue took the message) after which a
    #: pending message's confirm, or a delivery's redelivery, stops and it goes dead
    max_refusals: int = Field(default=20, ge=1)

    max_payload_bytes: int = Field(default=256 * 1024, ge=1)
    #: the largest AMQP content header (properties and headers, encoded) a message may
    #: make; it must fit in one frame of RabbitMQ's ``frame_max``
    max_header_bytes: int = Field(default=16 * 1024, ge=1024)
    max_request_bytes: int = Field(default=16 * 1024 * 1024, ge=1)
    max_batch: int = Field(default=1000, ge=1)

    checkback: CheckBackSettings = CheckBackSettings()
    redelivery: RedeliverySettings = RedeliverySettings()
    scanner: ScannerSettings = ScannerSettings()
    fallback: FallbackSettings = FallbackSettings()
    monitor: MonitorSettings = MonitorSettings()
    dashboard: DashboardSettings = DashboardSettings()
    limits: LimitSettings = LimitSettings()
    tcc: TccSettings = TccSettings()
    group_commit: GroupCommitSettings = GroupCommitSettings()

    producers: dict[str, ProducerSettings] = {}
    groups: dict[str, GroupSettings] = {}
    participants: dict[str, ParticipantSettings] = {}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init values; the environment overrides it.
        return env_settings, init_settings

    @field_validator("amqp_url", mode="before")
    @classmethod
    def _amqp_nodes(cls, value: Any) -> Any:
        if isinstance(value, str | list | tuple):
            return ",".join(amqp_nodes(value))
        return value

    @cached_property
    def amqp_urls(self) -> tuple[str, ...]:
        """The RabbitMQ nodes ``amqp_url`` names, in its order."""
        return amqp_nodes(self.amqp_url)

    @model_validator(mode="after")
    def _names(self) -> Settings:
        for kind, names in (
            ("producer", self.producers),
            ("group", self.groups),
            ("participant", self.participants),
        ):
            for name in names:
                if not NAME_RE.fullmatch(name):
                    raise ValueError(
                        f"{kind} name {name!r} must be lower case letters, digits, - or _"
                    )
        tokens = [t.get_secret_value() for t in self._tokens() if t is not None]
        if len(tokens) != len(set(tokens)):
            raise ValueError(
                "two principals (admin, producers, groups, participants) have the same token"
            )
        return self

    @model_validator(mode="after")
    def _calls_end_within_the_lease(self) -> Settings:
        for name, participant in self.participants.items():
            if participant.timeout is not None and participant.timeout >= self.tcc.lease:
                raise ValueError(
                    f"participants.{name}.timeout ({participant.timeout:g} s) must be shorter "
                    f"than tcc.lease ({self.tcc.lease:g} s): a transaction would be claimed "
                    "again while its calls are still in flight"
                )
        return self

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, url: str) -> str:
        """One Redis or a Redis Cluster (:mod:`reliable_msg.transports.redis_client`)."""
        return check_redis_url(url)

    def call_timeout(self, participant: str) -> float:
        """How long one call to ``participant`` may take."""
        timeout = self.participants[participant].timeout
        return timeout if timeout is not None else self.tcc.call_timeout

    @model_validator(mode="after")
    def _header_fits_a_frame(self) -> Settings:
        room = constants.AMQP_FRAME_MAX - constants.HEADER_GROWTH
        if self.max_header_bytes > room:
            raise ValueError(
                f"max_header_bytes ({self.max_header_bytes}) must be at most {room}: a "
                f"message's header must fit in one AMQP frame (RabbitMQ's frame_max is "
                f"{constants.AMQP_FRAME_MAX} by default)"
            )
        return self

    def _tokens(self) -> list[SecretStr | None]:
        return [
            self.admin_token,
            *(p.token for p in self.producers.values()),
            *(g.token for g in self.groups.values()),
            *(p.token for p in self.participants.values()),
        ]

    def queue_name(self, group: str) -> str:
        """The durable queue of ``group``."""
        settings = self.groups.get(group)
        return (settings.queue if settings else None) or f"{self.queue_prefix}{group}"

    @property
    def probe_queue(self) -> str:
        """The queue the recovery probe publishes to (no group name can produce it)."""
        return f"{self.queue_prefix}_probe"

    def dead_letter_queue(self, group: str) -> str:
        return self.queue_name(group) + constants.DEAD_LETTER_SUFFIX

    def max_attempts(self, group: str) -> int:
        settings = self.groups.get(group)
        if settings is not None and settings.max_attempts is not None:
            return settings.max_attempts
        return self.redelivery.max_attempts

    def shards(self, group: str) -> int:
        """How many fallback shards ``group`` has."""
        settings = self.groups.get(group)
        if settings is not None and settings.shards is not None:
            return settings.shards
        return self.fallback.shards

    def subscribers(self, topic: str) -> list[str]:
        """Groups whose topic patterns match ``topic``, in a stable order."""
        return [
            name
            for name, group in sorted(self.groups.items())
            if any(topic_matches(pattern, topic) for pattern in group.topics)
        ]

    @cached_property
    def _subscriber_cache(self) -> dict[str, list[str]]:
        return {}

    def subscribers_cached(self, topic: str) -> list[str]:
        """:meth:`subscribers`, memoised: configuration is frozen after start-up."""
        cache = self._subscriber_cache
        found = cache.get(topic)
        if found is None:
            found = cache[topic] = self.subscribers(topic)
        return found


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Read the TOML file at ``path`` (or ``$RMSG_CONFIG``) and the environment.

    Raises :class:`ConfigError` with a one-line reason when anything is wrong.
    """
    path = path or os.environ.get(CONFIG_ENV)
    data: dict[str, Any] = {}
    if path:
        data = _read_toml(Path(path))
    data.update(overrides)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, path)) from exc


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc


def _one_line(exc: ValidationError, path: str | Path | None) -> str:
    where = f" in {path}" if path else ""
    problems = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in error["loc"]) or "config"
        problems.append(f"{loc}: {error['msg']}")
    return f"invalid configuration{where}: " + "; ".join(problems)
