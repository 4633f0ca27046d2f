"""The soak run's outcome: a pure tally of what the books and the service hold at
quiescence, and its rendering.

Per order and consumer group, the number of effects is read off the books
(:data:`demo.verdict.EFFECTS`). A committed (paid) order must have exactly one effect in
every group, an order that was not committed none:

- lost: a committed order without an effect in a group (counted per order and group);
- duplicated: every effect beyond the first;
- phantom: an effect of an order that was never committed;
- stuck: a message neither done, cancelled nor dead once the run waited for quiescence.

The run passes when lost, duplicated, phantom and stuck are all 0 and no book is in an
impossible state, and, with TCC transactions beside the payments, when their tally
(:mod:`soak.tcc_books`) is clean too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from demo.books import Books
from demo.verdict import EFFECTS
from upstream_demo.store import message_id

from .tcc_books import TccTally

#: Message statuses that end a message's life.
FINAL = ("done", "cancelled", "dead")
#: The processes whose kills are environment faults (of :mod:`soak.plan`), not crashes
#: at a planned point: the service instances and the TCC participants.
ENVIRONMENT_KILLS = ("service-", "tcc-")


@dataclass(frozen=True, slots=True)
class FaultRecord:
    """One injected fault as it happened; times are seconds into the run."""

    label: str
    at_payment: int
    started: float
    ended: float
    outcome: str  #: what happened, or the error that stopped it
    ok: bool


@dataclass(frozen=True, slots=True)
class Tally:
    orders: int
    produced: int  #: messages the service holds (one per payment that got as far as prepare)
    committed: int  #: orders paid: their local transaction committed
    failed: int  #: orders whose local transaction rolled back
    uncommitted: int  #: orders left unpaid (every attempt to pay them failed)
    statuses: dict[str, int]  #: messages per status
    effects: dict[str, int]  #: effects per consumer group
    lost: dict[str, int]
    duplicated: dict[str, int]
    phantom: dict[str, int]
    broken: int  #: order rows whose books are in an impossible state
    disagreements: int  #: committed orders whose message is not done, and the converse

    @property
    def stuck(self) -> int:
        return sum(n for status, n in self.statuses.items() if status not in FINAL)

    @property
    def passed(self) -> bool:
        return (
            sum(self.lost.values()) == 0
            and sum(self.duplicated.values()) == 0
            and sum(self.phantom.values()) == 0
            and self.stuck == 0
            and self.broken == 0
        )


def tally(books: Books, messages: Mapping[str, str], groups: Sequence[str]) -> Tally:
    """Count the outcome from the books and every message's status by id."""
    lost: Counter[str] = Counter()
    duplicated: Counter[str] = Counter()
    phantom: Counter[str] = Counter()
    effects: Counter[str] = Counter()
    broken = 0
    for row in books.orders:
        committed = row.status == "paid"
        for group in groups:
            n = EFFECTS[group](row)
            if n is None:
                broken += 1
                continue
            effects[group] += n
            duplicated[group] += max(0, n - 1)
            lost[group] += int(committed and n == 0)
            phantom[group] += int(not committed and n > 0)
    statuses = Counter(messages.values())
    rows = books.orders
    return Tally(
        orders=len(rows),
        produced=len(messages),
        committed=sum(r.status == "paid" for r in rows),
        failed=sum(r.status == "failed" for r in rows),
        uncommitted=sum(r.status == "created" for r in rows),
        statuses=dict(statuses),
        effects={g: effects[g] for g in groups},
        lost={g: lost[g] for g in groups},
        duplicated={g: duplicated[g] for g in groups},
        phantom={g: phantom[g] for g in groups},
        broken=broken,
        disagreements=_disagreements(books, messages),
    )


def _disagreements(books: Books, messages: Mapping[str, str]) -> int:
    wrong = 0
    for row in books.orders:
        status = messages.get(message_id(row.id))
        if row.status == "paid":
            wrong += status != "done"
        else:
            wrong += status not in (None, "cancelled")
    return wrong


@dataclass
class Report:
    title: str
    tally: Tally
    faults: list[FaultRecord]
    restarts: dict[str, int]  #: per process
    planned_kills: dict[str, int]  #: per process: the kills the run injected
    paying: float  #: seconds from the first payment to the last answer
    quiescence: float | None  #: seconds from the last answer to quiescence; None: timed out
    elapsed: float
    tcc: TccTally | None = None  #: None: no TCC transactions ran
    #: seconds from the end of the TCC load until every transaction was final; None:
    #: timed out
    tcc_quiescence: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def injected(self) -> int:
        return sum(f.ok for f in self.faults)

    @property
    def crashes(self) -> int:
        """Kills of the order service and the consumers that happened as planned."""
        return sum(
            min(self.restarts.get(name, 0), kills)
            for name, kills in self.planned_kills.items()
            if not name.startswith(ENVIRONMENT_KILLS)
        )

    @property
    def passed(self) -> bool:
        tcc_passed = self.tcc is None or (self.tcc.passed and self.tcc_quiescence is not None)
        return self.tally.passed and self.quiescence is not None and tcc_passed

    def as_json(self) -> dict[str, Any]:
        t = self.tally
        return {
            "passed": self.passed,
            "orders": t.orders,
            "produced": t.produced,
            "committed": t.committed,
            "cancelled": t.statuses.get("cancelled", 0),
            "failed_orders": t.failed,
            "uncommitted_orders": t.uncommitted,
            "statuses": t.statuses,
            "effects": t.effects,
            "lost": sum(t.lost.values()),
            "duplicated": sum(t.duplicated.values()),
            "phantom": sum(t.phantom.values()),
            "stuck": t.stuck,
            "dead": t.statuses.get("dead", 0),
            "broken": t.broken,
            "disagreements": t.disagreements,
            "faults_injected": self.injected,
            "crashes_injected": self.crashes,
            "faults": [asdict(f) for f in self.faults],
            "restarts": self.restarts,
            "planned_kills": self.planned_kills,
            "paying_seconds": round(self.paying, 1),
            "quiescence_seconds": None if self.quiescence is None else round(self.quiescence, 1),
            "elapsed_seconds": round(self.elapsed, 1),
            "tcc": None if self.tcc is None else self.tcc.as_json(self.tcc_quiescence),
            "notes": self.notes,
        }

    def render(self, console: Console) -> None:
        console.print(self._faults_table())
        console.print(self._table())
        if self.tcc is not None:
            console.print(self.tcc.table(self.tcc_quiescence))
        for note in self.notes:
            console.print(f"[yellow]note:[/] {note}", highlight=False)
        if self.passed:
            tcc = ", no TCC transaction half-done" if self.tcc is not None else ""
            console.print(
                f"[bold green]PASSED[/]: nothing lost, nothing applied twice, nothing stuck{tcc}",
            )
        else:
            console.print("[bold red]FAILED[/]: see the rows marked above")

    def _faults_table(self) -> Table:
        table = Table(title="Injected faults", title_justify="left")
        for column in ("#", "fault", "after payment", "at", "lasted", "what happened"):
            table.add_column(column)
        for i, f in enumerate(self.faults, 1):
            style = "" if f.ok else "red"
            table.add_row(
                str(i),
                f.label,
                str(f.at_payment),
                f"{f.started:.1f} s",
                f"{f.ended - f.started:.1f} s",
                f.outcome,
                style=style,
            )
        return table

    def _table(self) -> Table:
        t = self.tally
        table = Table(title=self.title, title_justify="left")
        table.add_column("")
        table.add_column("found", justify="right")
        table.add_column("must be", justify="right")

        def row(what: str, found: int | str, must: int | None = None) -> None:
            bad = must is not None and found != must
            mark = "[red]" if bad else ""
            table.add_row(what, f"{mark}{found}", "" if must is None else str(must))

        row("messages produced", t.produced)
        row("committed (orders paid)", t.committed)
        row("cancelled (local transaction rolled back)", t.statuses.get("cancelled", 0))
        row("orders never paid (every attempt failed)", t.uncommitted)
        for group in t.effects:
            row(f"effects in {group}", t.effects[group], t.committed)
        row("lost (committed, never applied)", sum(t.lost.values()), 0)
        row("duplicated (applied twice)", sum(t.duplicated.values()), 0)
        row("phantom (applied, never committed)", sum(t.phantom.values()), 0)
        row("stuck (not done, cancelled nor dead)", t.stuck, 0)
        row("dead", t.statuses.get("dead", 0))
        row("books in an impossible state", t.broken, 0)
        row("faults injected", f"{self.injected} of {len(self.faults)} environment faults")
        row("crashes injected (between commit/confirm, effect/ack)", self.crashes)
        row("faults in all", self.injected + self.crashes)
        for name in sorted(self.restarts):
            planned = self.planned_kills.get(name, 0)
            row(f"restarts of {name}", f"{self.restarts[name]} ({planned} planned kills)")
        row("time paying", f"{self.paying:.1f} s")
        quiet = "timed out" if self.quiescence is None else f"{self.quiescence:.1f} s"
        row("time to quiescence", quiet)
        row("time in all", f"{self.elapsed:.1f} s")
        return table
