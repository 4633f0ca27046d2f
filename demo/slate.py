"""A clean slate for a run of the demo or the soak: the run's RabbitMQ objects, Redis
namespace and service database removed, the service database migrated afresh, the demo
schemas emptied and seeded."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import aio_pika
import asyncpg
import redis

from reliable_msg.transports.redis import delete_namespace

from . import books, rabbit
from .errors import DemoError
from .options import Names
from .processes import run_logged


async def fresh_slate(
    *,
    amqp_url: str,
    redis_url: str,
    names: Names,
    groups: Sequence[str],
    service_database_url: str,
    database_url: str,
    orders: int,
    migrate: Sequence[str],
    env: dict[str, str],
    log: Path,
) -> None:
    """Reset everything the run owns; ``migrate`` is the command line of
    ``reliable-msg migrate`` with the run's config, run with ``env``."""
    try:
        await rabbit.reset(amqp_url, names, groups)
        await delete_namespace(redis_url, names.namespace)
        await books.drop_database(service_database_url)
        await run_logged(migrate, log, env=env)
        await books.reset(database_url, orders)
    except (OSError, asyncpg.PostgresError, aio_pika.exceptions.AMQPError, redis.RedisError) as exc:
        raise DemoError(f"cannot reset the run: {exc!r}") from exc
