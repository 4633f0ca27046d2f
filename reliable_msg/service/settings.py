"""Typed settings: one TOML file plus ``RMSG_*`` environment variables (env wins).

Nested values use ``__`` in variable names: ``RMSG_PRODUCERS__ORDER__TOKEN`` sets the
token of producer ``order``, ``RMSG_PARTICIPANTS__INVENTORY__TOKEN`` that of TCC
participant ``inventory``; ``RMSG_REDELIVERY__MAX_ATTEMPTS`` a scanner setting.
"""

from __future__ import annotations

import os
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from reliable_msg import constants
from reliable_msg.errors import ConfigError
from reliable_msg.policy import NAME_RE, topic_matches
from reliable_msg.service.sections import (
    CheckBackSettings,
    DashboardSettings,
    FallbackSettings,
    GroupCommitSettings,
    GroupSettings,
    LimitSettings,
    MonitorSettings,
    ParticipantSettings,
    ProducerSettings,
    RedeliverySettings,
    ScannerSettings,
    Seconds,
    TccSettings,
)
from reliable_msg.transports.nodes import amqp_nodes
from reliable_msg.transports.redis_client import check_redis_url

#: Environment variable naming the TOML file when no ``--config`` is given.
CONFIG_ENV = "RMSG_CONFIG"

#: The sections live in :mod:`reliable_msg.service.sections`; they are named here too.
__all__ = [
    "CONFIG_ENV",
    "CheckBackSettings",
    "DashboardSettings",
    "FallbackSettings",
    "GroupCommitSettings",
    "GroupSettings",
    "LimitSettings",
    "MonitorSettings",
    "ParticipantSettings",
    "ProducerSettings",
    "RedeliverySettings",
    "ScannerSettings",
    "Seconds",
    "Settings",
    "TccSettings",
    "load_settings",
]


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
