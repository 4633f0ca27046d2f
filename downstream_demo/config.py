"""A consumer process's settings, from the environment.

| variable | meaning | default |
|---|---|---|
| ``DEMO_DATABASE_URL`` | the demo database | ``postgresql://postgres@127.0.0.1:5432/rmsg_demo`` |
| ``DEMO_SERVICE_URL`` | the reliable-msg service | ``http://127.0.0.1:8480`` |
| ``DEMO_<GROUP>_TOKEN`` | the group's token, e.g. ``DEMO_WMS_TOKEN`` | required |
| ``DEMO_AMQP_URL`` | RabbitMQ (nodes: comma-separated) | ``amqp://guest:guest@127.0.0.1:5672/`` |
| ``DEMO_QUEUE_PREFIX`` | the service's ``queue_prefix`` | ``rmsgdemo.`` |
| ``DEMO_REDIS_URL`` | Redis or Redis Cluster, for the switch | ``redis://127.0.0.1:6379/0`` |
| ``DEMO_NAMESPACE`` | the service's ``fallback.namespace`` | ``rmsgdemo`` |
| ``DEMO_SHARDS`` | the service's ``fallback.shards`` | ``16`` |
| ``DEMO_POLL_INTERVAL`` | the service's ``fallback.poll_interval`` | ``0.5`` |
| ``DEMO_CLAIM_IDLE`` | seconds before a dead consumer's Redis entry is taken over | ``5`` |
| ``DEMO_STATE_DIR`` | where injected crashes are remembered | ``.artifacts/demo/state`` |
| ``DEMO_CRASH_AFTER_EFFECT`` | order ids (``3,17``): die once after each one's effect | none |
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/rmsg_demo"
DEFAULT_SERVICE_URL = "http://127.0.0.1:8480"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
#: The demo service's queue prefix (demo/config.toml): its queues are ``rmsgdemo.<group>``.
DEFAULT_QUEUE_PREFIX = "rmsgdemo."
DEFAULT_STATE_DIR = ".artifacts/demo/state"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: The demo service's ``fallback.namespace``, ``fallback.shards`` and
#: ``fallback.poll_interval`` (demo/config.toml).
DEFAULT_NAMESPACE = "rmsgdemo"
DEFAULT_SHARDS = 16
DEFAULT_POLL_INTERVAL = 0.5
#: Short, so that an entry of a consumer killed during the outage is handled within
#: seconds; a handler takes milliseconds, so no live consumer's entry is taken over.
DEFAULT_CLAIM_IDLE = 5.0


@dataclass(frozen=True, slots=True)
class Config:
    group: str
    database_url: str
    service_url: str
    token: str
    amqp_url: str
    queue: str
    redis_url: str
    namespace: str
    shards: int
    poll_interval: float
    claim_idle: float
    state_dir: Path
    crash_after_effect: frozenset[int]

    @classmethod
    def from_env(cls, group: str) -> Config:
        env = os.environ
        token_variable = f"DEMO_{group.upper()}_TOKEN"
        token = env.get(token_variable)
        if not token:
            raise SystemExit(f"downstream_demo: set {token_variable} to the {group} group's token")
        return cls(
            group=group,
            database_url=env.get("DEMO_DATABASE_URL", DEFAULT_DATABASE_URL),
            service_url=env.get("DEMO_SERVICE_URL", DEFAULT_SERVICE_URL),
            token=token,
            amqp_url=env.get("DEMO_AMQP_URL", DEFAULT_AMQP_URL),
            queue=env.get("DEMO_QUEUE_PREFIX", DEFAULT_QUEUE_PREFIX) + group,
            redis_url=env.get("DEMO_REDIS_URL", DEFAULT_REDIS_URL),
            namespace=env.get("DEMO_NAMESPACE", DEFAULT_NAMESPACE),
            shards=int(env.get("DEMO_SHARDS", DEFAULT_SHARDS)),
            poll_interval=float(env.get("DEMO_POLL_INTERVAL", DEFAULT_POLL_INTERVAL)),
            claim_idle=float(env.get("DEMO_CLAIM_IDLE", DEFAULT_CLAIM_IDLE)),
            state_dir=Path(env.get("DEMO_STATE_DIR", DEFAULT_STATE_DIR)),
            crash_after_effect=parse_ids(env.get("DEMO_CRASH_AFTER_EFFECT", "")),
        )


def parse_ids(text: str) -> frozenset[int]:
    """``"3, 17,42"`` -> {3, 17, 42}."""
    return frozenset(int(part) for part in text.split(",") if part.strip())
