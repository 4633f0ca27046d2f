"""``reliable-msg serve`` processes configured like a test's settings, tokens included,
stopped whatever happens; and the clean-up of what they declared."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reliable_msg.harness.config import settings_data
from reliable_msg.harness.config import write_config as write_toml
from reliable_msg.harness.ports import free_port
from reliable_msg.harness.process import Process, blocking, serve_argv, stop, wait_ready
from reliable_msg.service.settings import Settings
from reliable_msg.transports.redis import delete_namespace
from tests.helpers import rabbit

#: How many PostgreSQL connections each test instance may hold (the server has 100).
POOL_SIZE = 4
#: Seconds an instance gets to become ready, and to stop after SIGTERM.
STARTUP = 30.0
GRACE = 15.0


def write_config(settings: Settings, path: Path, **overrides: Any) -> Path:
    """A TOML file with everything ``settings`` holds, tokens included, then ``overrides``
    (merged one level deep); returns ``path``."""
    data = settings_data(settings)
    data["db_pool_size"] = POOL_SIZE
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return write_toml(path, data)


@dataclass
class Instance(Process):
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


@contextmanager
def running(
    config: Path, log_dir: Path, *, count: int = 1, env: dict[str, str] | None = None
) -> Iterator[list[Instance]]:
    """Start ``count`` instances, wait until each is ready, yield them; stop them all
    afterwards (SIGTERM, then SIGKILL), even when the test failed."""
    instances: list[Instance] = []
    try:
        for i in range(count):
            instances.append(_start(config, log_dir / f"serve-{i}.log", env))
        for instance in instances:
            blocking(wait_ready(instance.url, instance, within=STARTUP))
        yield instances
    finally:
        stop(instances, GRACE)


@asynccontextmanager
async def running_async(
    config: Path, log_dir: Path, *, env: dict[str, str] | None = None, name: str = "serve-0"
) -> AsyncIterator[Instance]:
    """One instance as :func:`running` starts it, waited for and stopped without blocking
    the event loop: for tests whose loop also carries the instance's traffic (a fault
    proxy between it and PostgreSQL, RabbitMQ or Redis, a participant it calls). ``name``
    names its log, so that several instances of one test keep theirs apart."""
    instance = _start(config, log_dir / f"{name}.log", env)
    try:
        await wait_ready(instance.url, instance, within=STARTUP)
        yield instance
    finally:
        await asyncio.to_thread(stop, [instance], GRACE)


def _start(config: Path, log: Path, env: dict[str, str] | None) -> Instance:
    port = free_port()
    instance = Instance(
        log.stem,
        serve_argv(config, "--port", str(port)),
        {**os.environ, "RMSG_LOG_LEVEL": "info", **(env or {})},
        log,
        port=port,
    )
    instance.start()
    return instance


async def remove_traces(settings: Settings) -> None:
    """Delete the exchanges, queues and Redis keys the instances declared."""
    await rabbit.delete_topology(settings.amqp_url, settings)
    await delete_namespace(settings.redis_url, settings.fallback.namespace)
