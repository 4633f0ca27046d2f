"""Runs of ``python -m demo`` and ``python -m soak`` from the tests: names of their own,
removed afterwards, and a process group killed whole if the run hangs."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator, Sequence

from demo import books, rabbit
from demo.options import Names
from reliable_msg.transports.redis import delete_namespace
from tests.conftest import AMQP_URL, SERVER_URL

GROUPS = ("inventory", "credit", "wms")
REDIS_URL = "redis://127.0.0.1:6379/0"


def own_names(kind: str) -> Iterator[str]:
    """A tag naming a run's databases, RabbitMQ objects and Redis keys (for a fixture to
    yield); everything so named is removed afterwards."""
    tag = f"{kind}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    yield tag

    async def remove() -> None:
        await rabbit.reset(AMQP_URL, Names.of_prefix(tag), GROUPS)
        await delete_namespace(REDIS_URL, tag)
        for name in (tag, f"{tag}_service"):
            await books.drop_database(f"{SERVER_URL}/{name}")

    asyncio.run(remove())


def isolated(tag: str) -> list[str]:
    """The options that point a run at the names of ``tag``."""
    return [
        *("--database-url", f"{SERVER_URL}/{tag}"),
        *("--service-database-url", f"{SERVER_URL}/{tag}_service"),
        *("--amqp-url", AMQP_URL, "--redis-url", REDIS_URL, "--prefix", tag),
    ]


def run_group(
    argv: Sequence[str], timeout: float, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """Run in a process group of its own (with ``env`` over this one's environment);
    kill the whole group if it outlives ``timeout``, so that no process it started
    outlives the test."""
    env = {**os.environ, "COLUMNS": "120", **(env or {})}
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out.decode(errors="replace")
