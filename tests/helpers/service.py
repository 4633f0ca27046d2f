"""``reliable-msg serve`` processes configured like a test's settings, tokens included,
stopped whatever happens; and the clean-up of what they declared."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from reliable_msg.service.settings import Settings
from reliable_msg.transports.redis import delete_namespace
from tests.helpers import rabbit
from tests.helpers.processes import _wait_ready, free_port, toml
from tests.helpers.waiting import wait_until

#: How many PostgreSQL connections each test instance may hold (the server has 100).
POOL_SIZE = 4


def write_config(settings: Settings, path: Path, **overrides: Any) -> Path:
    """A TOML file with everything ``settings`` holds, tokens included, then ``overrides``
    (merged one level deep); returns ``path``."""
    data = settings.model_dump(mode="json", exclude={"producers", "groups", "admin_token"})
    data["db_pool_size"] = POOL_SIZE
    if settings.admin_token is not None:
        data["admin_token"] = settings.admin_token.get_secret_value()
    data["producers"] = {
        name: {"check_url": str(p.check_url), **_token(p.token)}
        for name, p in settings.producers.items()
    }
    data["groups"] = {
        name: {**g.model_dump(mode="json", exclude={"token"}), **_token(g.token)}
        for name, g in settings.groups.items()
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path.write_text(toml(_without_none(data)))
    return path


def _token(token: Any) -> dict[str, str]:
    return {"token": token.get_secret_value()} if token is not None else {}


def _without_none(data: dict[str, Any]) -> dict[str, Any]:
    return {
        k: _without_none(v) if isinstance(v, dict) else v for k, v in data.items() if v is not None
    }


@dataclass
class Instance:
    port: int
    log: Path
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def kill(self) -> None:
        """SIGKILL: no shutdown, connections and transactions cut where they are."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


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
            _wait_ready(instance.port, instance.log)
        yield instances
    finally:
        _stop(instances)


@asynccontextmanager
async def running_async(
    config: Path, log_dir: Path, *, env: dict[str, str] | None = None
) -> AsyncIterator[Instance]:
    """One instance as :func:`running` starts it, waited for and stopped without blocking
    the event loop: for tests whose loop also carries the instance's traffic (a fault
    proxy between it and PostgreSQL, RabbitMQ or Redis)."""
    instance = _start(config, log_dir / "serve-0.log", env)
    try:
        await wait_ready(instance)
        yield instance
    finally:
        await asyncio.to_thread(_stop, [instance])


async def wait_ready(instance: Instance, within: float = 30.0) -> None:
    """Wait until ``instance`` answers ``/readyz`` with 200; fail with its log if it
    exits first or is not ready within ``within`` seconds."""

    async def ready_or_gone() -> bool:
        if instance.proc.poll() is not None:
            return True
        try:
            async with httpx.AsyncClient(timeout=1) as client:
                return (await client.get(f"{instance.url}/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        await wait_until(ready_or_gone, within=within, every=0.2)
    except AssertionError as exc:
        raise AssertionError(f"service not ready ({exc}); log:\n{instance.log_tail()}") from exc
    code = instance.proc.poll()
    assert code is None, f"service exited with {code}; log:\n{instance.log_tail()}"


def _start(config: Path, log: Path, env: dict[str, str] | None) -> Instance:
    port = free_port()
    command = [sys.executable, "-m", "reliable_msg", "--config", str(config), "serve"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*command, "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RMSG_LOG_LEVEL": "info", **(env or {})},
        )
    return Instance(port, log, proc)


def _stop(instances: list[Instance]) -> None:
    for instance in instances:
        if instance.proc.poll() is None:
            instance.proc.send_signal(signal.SIGTERM)
    for instance in instances:
        try:
            instance.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            instance.proc.kill()
            instance.proc.wait()


async def remove_traces(settings: Settings) -> None:
    """Delete the exchanges, queues and Redis keys the instances declared."""
    await rabbit.delete_topology(settings.amqp_url, settings)
    await delete_namespace(settings.redis_url, settings.fallback.namespace)
