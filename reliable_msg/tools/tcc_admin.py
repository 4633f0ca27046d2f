"""The operators' TCC commands: ``reliable-msg tcc list``, ``tcc show`` and ``tcc retry``.

Like the other admin commands (:mod:`reliable_msg.tools.admin`) they work on the
database from the configuration, with no service running: each opens a
:class:`Runtime` without scanners and calls the coordinator's use-cases, the same the
``/v1/tcc/`` API calls.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from reliable_msg.service.settings import Settings
from reliable_msg.service.tcc.states import TxStatus
from reliable_msg.service.tcc.transaction import Transaction
from reliable_msg.tools.admin import opened, when


async def list_transactions(
    settings: Settings,
    console: Console,
    *,
    status: TxStatus | None,
    stalled: bool | None,
    participant: str | None,
    initiator: str | None,
    limit: int,
) -> None:
    """Transactions newest first, filtered."""
    async with opened(settings) as runtime:
        page = await runtime.coordinator.page(
            status=status,
            stalled=stalled,
            participant=participant,
            initiator=initiator,
            limit=limit,
            before=None,
        )
    console.print(_list_table(page.transactions))
    more = " (more: raise --limit or narrow the filters)" if page.next_cursor else ""
    console.print(f"{len(page.transactions)} transaction(s), newest first{more}")


async def show(settings: Settings, console: Console, gid: str) -> None:
    """One transaction with its branches and its event log; raises :class:`NotFound`."""
    async with opened(settings) as runtime:
        tx = await runtime.coordinator.get(gid, None)
    _print_detail(console, tx)


async def retry(settings: Settings, console: Console, gid: str) -> None:
    """Retry now: the waits of ``gid`` and of its branches reset, so the driver of every
    running instance calls them at its next pass; raises :class:`NotFound`, or
    :class:`Conflict` unless the transaction is confirming or cancelling."""
    async with opened(settings) as runtime:
        tx = await runtime.coordinator.retry(gid)
    waiting = sum(1 for b in tx.branches if b.status == "registered")
    console.print(
        f"retry asked for {gid} ({tx.status}): its {waiting or 'unfinished'} branch(es) are"
        " called again at the next pass of the running instances"
    )


def _list_table(transactions: list[Transaction]) -> Table:
    table = Table()
    table.add_column("gid", no_wrap=True)
    for name in ("status", "initiator", "created", "attempts", "next try", "stalled"):
        table.add_column(name)
    for tx in transactions:
        table.add_row(
            tx.gid,
            tx.status.value,
            tx.initiator,
            when(tx.created_at),
            str(tx.attempts),
            when(tx.next_try_at),
            "STALLED" if tx.stalled else "",
        )
    return table


def _print_detail(console: Console, tx: Transaction) -> None:
    facts = Table(show_header=False, title=f"transaction {tx.gid}")
    facts.add_column(style="bold")
    facts.add_column()
    for name, value in (
        ("status", tx.status.value + (" (STALLED)" if tx.stalled else "")),
        ("initiator", tx.initiator),
        ("timeout", f"{tx.timeout:g} s"),
        ("deadline", when(tx.deadline)),
        ("created", when(tx.created_at)),
        ("updated", when(tx.updated_at)),
        ("finished", when(tx.finished_at)),
        ("rounds", str(tx.attempts)),
        ("next try", when(tx.next_try_at)),
    ):
        facts.add_row(name, value)
    console.print(facts)
    branches = Table(title="branches")
    for name in ("branch", "participant", "status", "attempts", "next try", "last status"):
        branches.add_column(name)
    branches.add_column("last error")
    for b in tx.branches:
        branches.add_row(
            b.branch,
            b.participant,
            b.status.value,
            str(b.attempts),
            when(b.next_try_at),
            str(b.last_status) if b.last_status is not None else "-",
            b.last_error or "-",
        )
    console.print(branches)
    events = Table(title="event log")
    for name in ("at", "branch", "op", "outcome", "http", "error", "instance"):
        events.add_column(name)
    for e in tx.events:
        events.add_row(
            when(e.at),
            e.branch or "-",
            e.op,
            e.outcome,
            str(e.http_status) if e.http_status is not None else "-",
            e.error or "",
            e.instance or "",
        )
    console.print(events)
