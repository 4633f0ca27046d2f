"""The real servers of this machine that a tool stops, kills and starts again: RabbitMQ,
Redis and PostgreSQL on their usual localhost ports.

Here are their command lines, the checks whether they answer, the waits until they do
(or until their port is closed), and the synchronous control the tests use. Each tool
keeps its own policy: how long it waits, how it runs a command (the tests quietly, the
demo and the soak run with the output in their logs), what it says when a server does
not come back, and that a server it stopped is started again whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import aio_pika
import asyncpg

from reliable_msg.errors import ReliableMsgError

from .ports import port_open
from .rabbit_cluster import MARK

RABBITMQ_PORT = 5672
REDIS_PORT = 6379

#: Seconds a ``rabbitmqctl`` command gets (it waits for the node when that is slow).
CTL_TIMEOUT = 120.0

#: The RabbitMQ node started again, in the background.
START_RABBITMQ_NODE = ("rabbitmq-server", "-detached")
#: Redis shut down at once, without writing its data (it keeps none: ``--save ""``).
STOP_REDIS = ("redis-cli", "-p", str(REDIS_PORT), "shutdown", "nosave")
#: Redis started in the background as ``scripts/services.sh`` starts it.
START_REDIS = (
    "redis-server",
    "--daemonize",
    "yes",
    "--bind",
    "127.0.0.1",
    "-::1",
    "--port",
    str(REDIS_PORT),
    "--save",
    "",
    "--appendonly",
    "no",
    "--dir",
    "/var/lib/redis",
    "--logfile",
    "/var/log/redis/ci.log",
)
#: Where Debian's PostgreSQL clusters are configured (``/etc/postgresql/<version>/main``).
PG_CLUSTERS = Path("/etc/postgresql")


class NotBack(ReliableMsgError):
    """A server started again does not take connections in time."""


def rabbitmqctl(*args: str) -> list[str]:
    """The command line of ``rabbitmqctl`` with ``args`` (``stop_app``, ``start_app``,
    ``close_all_connections``; ``-q`` first for less output)."""
    return ["rabbitmqctl", *args]


def pg_ctlcluster(version: str, action: str) -> list[str]:
    """The command line that does ``action`` (``start``, ``restart``) to the cluster
    ``main`` of PostgreSQL ``version``, without asking systemd."""
    return ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action]


def pg_version() -> str | None:
    """The version of Debian's PostgreSQL cluster ``main``; None if there is none here."""
    if not PG_CLUSTERS.is_dir():
        return None
    versions = sorted((p.name for p in PG_CLUSTERS.iterdir()), key=_numeric)
    return versions[-1] if versions else None


def _numeric(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())


# -- whether a server answers, and waiting until it does ---------------------------------


async def rabbitmq_answers(url: str) -> bool:
    """Whether RabbitMQ takes an AMQP connection now."""
    try:
        connection = await aio_pika.connect(url, timeout=2)
    except (OSError, aio_pika.exceptions.AMQPError, TimeoutError):
        return False
    await connection.close()
    return True


async def postgres_answers(dsn: str) -> bool:
    """Whether PostgreSQL takes a connection to ``dsn`` now."""
    try:
        conn = await asyncpg.connect(dsn, timeout=2)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
        return False
    await conn.close()
    return True


async def wait_until(check: Callable[[], Awaitable[bool]], *, within: float, every: float) -> bool:
    """Ask ``check`` every ``every`` seconds until it says yes; whether it did within
    ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(every)
    return True


def wait_port(port: int, *, open: bool = True, within: float, every: float) -> bool:
    """Wait until localhost's ``port`` takes connections (``open``) or refuses them;
    whether it did within ``within`` seconds."""
    deadline = time.monotonic() + within
    while port_open(port) != open:
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


# -- synchronous control, each command's output kept from the caller's --------------------


def stop_rabbitmq_app() -> None:
    """``rabbitmqctl stop_app``: the node runs on, the broker takes no connection."""
    _quiet(rabbitmqctl("-q", "stop_app"), timeout=CTL_TIMEOUT)


def machine_rabbitmq_pids() -> list[int]:
    """The Erlang VM of the machine's RabbitMQ node (:func:`is_machine_rabbitmq`)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if is_machine_rabbitmq(argv):
            pids.append(int(entry.name))
    return pids


def is_machine_rabbitmq(argv: Sequence[bytes]) -> bool:
    """Whether command line ``argv`` is the machine's RabbitMQ node: a ``beam.smp`` that
    boots ``rabbit`` and is none of the nodes :mod:`.rabbit_cluster` starts (they carry
    its mark; a pattern on the command line alone would take them too). Its node name is
    not on the command line (the environment gives it), nor is that of ours."""
    return (
        bool(argv)
        and argv[0].endswith(b"beam.smp")
        and b"rabbit" in argv
        and MARK.encode() not in argv
    )


def kill_rabbitmq_node(*, within: float) -> None:
    """SIGKILL to the whole RabbitMQ node of this machine; wait up to ``within`` seconds
    for its port to close."""
    for pid in machine_rabbitmq_pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_port(RABBITMQ_PORT, open=False, within=within, every=0.1)


def start_rabbitmq(*, within: float) -> None:
    """Start RabbitMQ's application, or its node if that is gone, unless its port
    answers; wait until it does and the broker is up. :class:`NotBack` after ``within``
    seconds."""
    if port_open(RABBITMQ_PORT):
        return
    try:
        _quiet(rabbitmqctl("-q", "start_app"), timeout=CTL_TIMEOUT)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        # The node itself is gone: start it again.
        subprocess.run(START_RABBITMQ_NODE, check=True, timeout=60)
    if not wait_port(RABBITMQ_PORT, within=within, every=0.5):
        raise NotBack(f"RabbitMQ did not come back within {within:.0f} s")
    subprocess.run(rabbitmqctl("-q", "await_startup"), capture_output=True, timeout=CTL_TIMEOUT)


def stop_redis(*, within: float) -> None:
    """Shut Redis down; wait up to ``within`` seconds for its port to close."""
    subprocess.run(STOP_REDIS, timeout=30, capture_output=True)
    wait_port(REDIS_PORT, open=False, within=within, every=0.1)


def start_redis(*, within: float) -> None:
    """Start Redis unless its port answers; wait until it does. :class:`NotBack` after
    ``within`` seconds."""
    if port_open(REDIS_PORT):
        return
    subprocess.run(START_REDIS, check=True, timeout=30)
    if not wait_port(REDIS_PORT, within=within, every=0.2):
        raise NotBack(f"Redis did not come back within {within:.0f} s")


def _quiet(argv: list[str], *, timeout: float) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=timeout)
