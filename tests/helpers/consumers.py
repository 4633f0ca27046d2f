"""An in-process consumer of the test's ``inventory`` group, wired to the test settings."""

from __future__ import annotations

from typing import Any, TypeVar

import asyncpg

from reliable_msg.client import RetryPolicy
from reliable_msg.consumer import Consumer
from reliable_msg.settings import Settings
from tests.conftest import AMQP_URL, GROUP_TOKENS

C = TypeVar("C", bound=Consumer)


def inventory_consumer(
    service_url: str,
    settings: Settings,
    pool: asyncpg.Pool,
    retry: RetryPolicy,
    cls: type[C],
    **options: Any,
) -> C:
    return cls(
        "inventory",
        service_url=service_url,
        token=GROUP_TOKENS["inventory"],
        amqp_url=AMQP_URL,
        pool=pool,
        queue=settings.queue_name("inventory"),
        retry=retry,
        **options,
    )
