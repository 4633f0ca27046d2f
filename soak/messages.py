"""The reliable messages' side of a soak run: one order paid until its answer is
definitive, and the wait for the messages' quiescence."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import aio_pika
from rich.progress import Progress

from demo import rabbit
from demo.admin import ServiceAdmin
from demo.shop import Shop
from reliable_msg.errors import ReliableMsgError

from .options import Options

#: Seconds one payment is retried before the run gives up on it.
PAY_PATIENCE = 300.0
#: Pause between two attempts at a payment.
PAY_RETRY = 0.5
#: Seconds between two looks at the service, waiting for quiescence.
POLL = 0.5


async def pay_one(
    shop: Shop, order_id: int, query: dict[str, str], event: Callable[[str], None]
) -> None:
    """Pay until the answer is definitive: paid, or the payment failed. Anything else
    (no answer, 503, a 500 of a database cut) is tried again: paying is idempotent."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PAY_PATIENCE
    while True:
        answer = await shop.pay(order_id, query)
        if answer.status == 200 and answer.body.get("status") == "paid":
            return
        if answer.code in ("payment_failed", "not_payable"):
            return
        if loop.time() > deadline:
            event(f"[red]order {order_id}: gave up paying ({answer.summary})[/]")
            return
        await asyncio.sleep(PAY_RETRY)


async def quiescence(
    admin: ServiceAdmin,
    o: Options,
    progress: Callable[[], Progress],
    event: Callable[[str], None],
) -> bool:
    """Wait until no message is pending or sent, the switch is normal, the Redis
    shards and the groups' queues are empty; False after ``o.timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + o.timeout
    with progress() as bar:
        task = bar.add_task("waiting for quiescence", total=o.messages)
        while loop.time() < deadline:
            with contextlib.suppress(ReliableMsgError, OSError, aio_pika.exceptions.AMQPError):
                counts = await admin.message_counts()
                final = sum(counts.get(s, 0) for s in ("done", "cancelled", "dead"))
                bar.update(task, completed=final)
                if await _quiet(admin, o, counts):
                    return True
            await asyncio.sleep(POLL)
    event(f"[red]no quiescence within {o.timeout:.0f} s[/]")
    return False


async def _quiet(admin: ServiceAdmin, o: Options, counts: dict[str, int]) -> bool:
    if counts.get("pending", 0) or counts.get("sent", 0):
        return False
    broker = await admin.broker()
    depth = broker.get("fallback_depth") or {}
    if broker.get("mode") != "normal" or any(depth.get(g) for g in o.groups):
        return False
    states = await rabbit.queue_states(o.amqp_url, o.names, o.groups)
    return all(s.ready == 0 for s in states.values())
