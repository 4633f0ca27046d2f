"""The run's outcome as a table (rich) and a verdict line."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .verdict import CONSISTENCY, OUTAGE, Check, Outcome


def table(outcome: Outcome, title: str) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("area", style="bold")
    t.add_column("check")
    t.add_column("found", justify="right")
    t.add_column("expected", justify="right")
    t.add_column("", justify="center")
    checks = outcome.checks
    for i, check in enumerate(checks):
        first = i == 0 or checks[i - 1].area != check.area
        last = i == len(checks) - 1 or checks[i + 1].area != check.area
        t.add_row(
            check.area if first else "",
            check.what,
            str(check.found),
            check.expectation,
            _mark(check),
            end_section=last,
        )
    return t


def _mark(check: Check) -> str:
    if check.expected is None:
        return ""
    return "[green]ok[/]" if check.ok else "[bold red]FAIL[/]"


def verdict(console: Console, outcome: Outcome, timed_out: bool) -> None:
    _balance(
        console,
        "verdict",
        outcome,
        "every paid order has exactly one effect in inventory, credit and wms, and every"
        " unpaid order has none",
    )
    if timed_out:
        console.print("[bold red]timed out[/] waiting for every message to be settled")
    elif outcome.as_planned:
        outage = any(c.area == OUTAGE for c in outcome.checks)
        also = ", RabbitMQ's outage included," if outage else ""
        console.print(
            f"every injected failure{also} happened and healed as planned", soft_wrap=True
        )
    else:
        _not_as_planned(console, outcome)


def tcc_verdict(console: Console, outcome: Outcome) -> None:
    """The TCC part's verdict line, and whether its faults healed as planned."""
    _balance(
        console,
        "TCC verdict",
        outcome,
        "every order is PAYED with its four effects confirmed or CANCELED with none left;"
        " no stock frozen, no points prepared; stock and points conserved",
    )
    if outcome.as_planned:
        console.print(
            "every injected TCC fault happened and healed as planned; every transaction"
            " confirmed or cancelled, none stalled",
            soft_wrap=True,
        )
    else:
        _not_as_planned(console, outcome, "TCC ")


def _balance(console: Console, label: str, outcome: Outcome, balanced: str) -> None:
    if outcome.balanced:
        console.print(f"[bold green]{label}: BALANCED[/] - {balanced}", soft_wrap=True)
    else:
        failed = [c.what for c in outcome.checks if c.area == CONSISTENCY and not c.ok]
        console.print(f"[bold red]{label}: NOT BALANCED[/] - {'; '.join(failed)}", soft_wrap=True)


def _not_as_planned(console: Console, outcome: Outcome, what: str = "") -> None:
    failed = [f"{c.area}: {c.what}" for c in outcome.checks if not c.ok]
    console.print(f"[bold red]{what}not as planned[/]: {'; '.join(failed)}", soft_wrap=True)
