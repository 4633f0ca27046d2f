"""The operators' commands: ``reliable-msg status``, ``messages list``, ``messages show``,
``requeue`` and ``purge``.

They work on the database, Redis and the broker directly, from the configuration, with
no service running: each opens a :class:`Runtime` without scanners, calls the same
use-cases as the HTTP API and prints rich tables.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from reliable_msg.errors import Code, Unprocessable
from reliable_msg.message import Message, Transition
from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from reliable_msg.states import MessageStatus

log = logging.getLogger(__name__)

#: Units of ``purge --older-than``: ``90s``, ``30m``, ``12h``, ``7d``, ``2w``.
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")


def parse_age(text: str) -> float:
    """Seconds in ``text`` (``7d``, ``12h``, ``30m``, ``90s``, ``2w``; a bare number is
    seconds); raise ValueError for anything else."""
    match = _AGE.match(text.lower())
    if not match:
        raise ValueError(f"{text!r} is not an age such as 7d, 12h, 30m or 90s")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


@asynccontextmanager
async def opened(settings: Settings, *, rabbitmq: bool = False) -> AsyncIterator[Runtime]:
    """A runtime without scanners, with the switch read from Redis, and connected to
    RabbitMQ when ``rabbitmq`` (it keeps trying in the background if it cannot)."""
    runtime = await Runtime.create(settings, scanners=False)
    try:
        await runtime.degradation.read_switch()
        if rabbitmq:
            await runtime.degradation.rabbitmq.start()
        yield runtime
    finally:
        await runtime.stop()


# -- commands ----------------------------------------------------------------------------


async def status(settings: Settings, console: Console) -> None:
    """Counts per status, per topic and per group; mode, fallback depth, switch history."""
    async with opened(settings) as runtime:
        stats = await runtime.usecases.stats()
        report = await runtime.broker_report()
    console.print(_counts_table(stats["messages"]))
    console.print(_groups_table(settings, stats["groups"], report.get("fallback_depth", {})))
    if stats["topics"]:
        console.print(_topics_table(stats["topics"]))
    console.print(f"mode: {report['mode']}")
    if "fallback_error" in report:
        console.print(f"Redis: {report['fallback_error']}")
    history = report.get("history", [])
    console.print(_history_table(history) if history else "switch history: never flipped")


async def list_messages(
    settings: Settings,
    console: Console,
    *,
    status: MessageStatus | None,
    topic: str | None,
    group: str | None,
    limit: int,
) -> None:
    async with opened(settings) as runtime:
        page = await runtime.usecases.page(
            status=status, topic=topic, group=group, limit=limit, after=None
        )
    console.print(_messages_table(page.messages))
    more = " (more: raise --limit or narrow the filters)" if page.next_cursor else ""
    console.print(f"{len(page.messages)} message(s), oldest first{more}")


async def show(settings: Settings, console: Console, id: str) -> None:
    """One message with its deliveries and history; raises :class:`NotFound`."""
    async with opened(settings) as runtime:
        message = await runtime.usecases.get(id, None)
        history = await runtime.usecases.history(id)
    _print_detail(console, message, history)


async def requeue_one(settings: Settings, console: Console, id: str) -> None:
    async with opened(settings, rabbitmq=True) as runtime:
        message = await runtime.usecases.requeue(id)
    what = "check-back starts again" if message.status is MessageStatus.PENDING else "republished"
    console.print(f"requeued {id}: now {message.status} ({what})")


async def requeue_group(
    settings: Settings,
    console: Console,
    *,
    group: str,
    topic: str | None,
    confirm: Callable[[int], bool],
) -> None:
    """Requeue every dead message of ``group`` (and ``topic``) once ``confirm`` agrees
    for the number of dead deliveries the group has."""
    if group not in settings.groups:
        raise Unprocessable(f"no consumer group {group!r}", code=Code.UNKNOWN_GROUP)
    async with opened(settings, rabbitmq=True) as runtime:
        dead = (await runtime.usecases.stats())["groups"].get(group, {}).get("dead", 0)
        if not dead:
            console.print(f"group {group} has no dead delivery: nothing to requeue")
            return
        if not confirm(dead):
            console.print("nothing requeued")
            return
        done = await runtime.usecases.requeue_all(topic, group)
        left = (await runtime.usecases.stats())["groups"].get(group, {}).get("dead", 0)
    console.print(
        f"republished {max(0, dead - left)} dead deliveries of group {group};"
        f" {done.requeued} message(s) requeued"
    )
    if done.refused:
        console.print(
            f"the broker refused {len(done.refused)} (they stay dead): {', '.join(done.refused)}"
        )


async def purge(settings: Settings, console: Console, older_than: float) -> None:
    async with opened(settings) as runtime:
        deleted = await runtime.usecases.purge(older_than)
    console.print(f"purged {deleted} done or cancelled message(s) older than {older_than:g}s")


# -- tables ------------------------------------------------------------------------------


def when(value: datetime | float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int | float):
        value = datetime.fromtimestamp(value, UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _counts_table(counts: dict[str, int]) -> Table:
    table = Table(title="messages")
    for s in MessageStatus:
        table.add_column(s.value, justify="right")
    table.add_row(*(str(counts.get(s.value, 0)) for s in MessageStatus))
    return table


def _groups_table(
    settings: Settings, groups: dict[str, dict[str, int]], depth: dict[str, int]
) -> Table:
    table = Table(title="consumer groups")
    for name in ("group", "sent", "done", "dead", "fallback depth"):
        table.add_column(name, justify="left" if name == "group" else "right")
    for group in sorted(set(settings.groups) | set(groups)):
        row = groups.get(group, {})
        cells = [str(row.get(s, 0)) for s in ("sent", "done", "dead")]
        table.add_row(group, *cells, str(depth.get(group, "-")))
    return table


def _topics_table(topics: dict[str, dict[str, int]]) -> Table:
    table = Table(title="topics")
    table.add_column("topic")
    for s in MessageStatus:
        table.add_column(s.value, justify="right")
    for topic, row in sorted(topics.items()):
        table.add_row(topic, *(str(row.get(s.value, 0)) for s in MessageStatus))
    return table


def _history_table(history: list[dict[str, Any]]) -> Table:
    table = Table(title="switch history (newest first)")
    for name in ("at", "mode", "by", "reason"):
        table.add_column(name)
    for h in history:
        table.add_row(when(h.get("at")), h.get("mode", ""), h.get("by", ""), h.get("reason", ""))
    return table


def _messages_table(messages: list[Message]) -> Table:
    table = Table()
    table.add_column("id", no_wrap=True)
    for name in ("topic", "status", "producer", "created", "last error"):
        table.add_column(name)
    for m in messages:
        error = (m.last_error or "")[:60]
        table.add_row(m.id, m.topic, m.status.value, m.producer, when(m.created_at), error)
    return table


def _print_detail(console: Console, m: Message, history: list[Transition]) -> None:
    facts = Table(show_header=False, title=f"message {m.id}")
    facts.add_column(style="bold")
    facts.add_column()
    for name, value in (
        ("status", m.status.value),
        ("topic", m.topic),
        ("producer", m.producer),
        ("key", m.key or "-"),
        ("groups", ", ".join(m.groups)),
        ("created", when(m.created_at)),
        ("sent", when(m.sent_at)),
        ("finished", when(m.finished_at)),
        ("check-backs", str(m.check_attempts)),
        ("last error", m.last_error or "-"),
        ("headers", json.dumps(m.headers, ensure_ascii=False)),
        ("payload", m.payload),
    ):
        facts.add_row(name, value)
    console.print(facts)
    deliveries = Table(title="deliveries")
    for name in ("group", "status", "attempts", "next try", "last error", "done"):
        deliveries.add_column(name)
    for d in m.deliveries:
        deliveries.add_row(
            d.group,
            d.status.value,
            str(d.attempts),
            when(d.next_attempt_at),
            d.last_error or "-",
            when(d.done_at),
        )
    console.print(deliveries)
    moves = Table(title="history")
    for name in ("at", "group", "from", "to", "why"):
        moves.add_column(name)
    for t in history:
        moves.add_row(
            when(t.at),
            t.group_name or "message",
            t.from_status or "-",
            t.to_status,
            t.reason or "",
        )
    console.print(moves)
