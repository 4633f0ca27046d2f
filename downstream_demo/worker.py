"""One consumer group's process: the consumer SDK over the group's schema, with the
demo's injected crash.

The crash (``DEMO_CRASH_AFTER_EFFECT``): right after the handler's transaction committed
(the effect and the inbox row are in) and before the message is acked, the process kills
itself with SIGKILL. The demo runner restarts it; RabbitMQ and the service's redelivery
bring the message back, and the inbox must keep it from having a second effect. A marker
file per (group, order) makes each crash happen once, so a broken inbox shows up as a
double effect in the books rather than as a crash loop.

The crash waits for its marker, not for a fresh handling: two chosen orders can commit
in one shared transaction (or in two at once), and the first one's crash kills the
process before the second one's turn. The second is then redelivered as a duplicate,
its effect in and still not acked, and it crashes there, so every planned crash happens
whatever the batches were.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import asyncpg

from reliable_msg.sdk.consumer import Consumer, Received

from .config import Config
from .group import Group

log = logging.getLogger(__name__)

#: The topic every demo group consumes.
TOPIC = "order.paid"


class CrashingConsumer(Consumer):
    """A :class:`Consumer` that dies once after the effect of each chosen order."""

    def __init__(
        self, group: str, *, crash_after_effect: frozenset[int], state_dir: Path, **kw: Any
    ) -> None:
        super().__init__(group, **kw)
        self._crash_after_effect = crash_after_effect
        self._state_dir = state_dir

    async def handle(self, received: Received) -> bool:
        fresh = await super().handle(received)
        order_id = _order_id(received)
        if order_id in self._crash_after_effect and self._first_crash(order_id):
            how = "handled and committed" if fresh else "committed before, redelivered"
            log.warning("injected crash: order %s %s, not acked", order_id, how)
            os.kill(os.getpid(), signal.SIGKILL)
        return fresh

    def _first_crash(self, order_id: int) -> bool:
        """Record the crash for ``order_id``; False if it was recorded before."""
        self._state_dir.mkdir(parents=True, exist_ok=True)
        marker = self._state_dir / crash_marker(self.group, order_id)
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.fsync(fd)
        os.close(fd)
        return True


def crash_marker(group: str, order_id: int) -> str:
    """The state file recording that ``group`` crashed after ``order_id``'s effect."""
    return f"crashed-{group}-{order_id}"


def _order_id(received: Received) -> int | None:
    payload = received.payload
    value = payload.get("order_id") if isinstance(payload, dict) else None
    return value if isinstance(value, int) else None


async def run(group: Group, config: Config) -> None:
    # Eight connections keep up with the demo, and leave room on a shared PostgreSQL.
    pool = await asyncpg.create_pool(
        config.database_url, min_size=1, max_size=8, server_settings={"search_path": group.schema}
    )
    try:
        async with pool.acquire() as conn:
            await group.install(conn)
        consumer = CrashingConsumer(
            group.name,
            crash_after_effect=config.crash_after_effect,
            state_dir=config.state_dir,
            service_url=config.service_url,
            token=config.token,
            amqp_url=config.amqp_url,
            pool=pool,
            queue=config.queue,
            redis_url=config.redis_url,
            namespace=config.namespace,
            shards=config.shards,
            poll_interval=config.poll_interval,
            claim_idle=config.claim_idle,
        )
        consumer.add_handler(TOPIC, group.handler)
        await consumer.run()
    finally:
        await pool.close()
