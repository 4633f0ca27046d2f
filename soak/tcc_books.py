"""The TCC side's outcome: the coordinator's rows and the participants' books read at
quiescence, a pure tally of them, and its table.

Per transaction at the coordinator (its status and its branches') and per branch at
its participant (how often each handler ran, from the participant's log of runs, and
whether its barrier recorded a Cancel before the Try):

- half-done: a transaction with one branch confirmed and another cancelled, or a final
  transaction whose participants' effects disagree with its status (confirmed: every
  branch tried and confirmed, none cancelled; cancelled: none confirmed, and each
  branch's Try given back by its Cancel or never run), or an effect of a branch the
  coordinator does not know;
- applied twice: a handler run more than once for one branch (a Try, Confirm or Cancel
  effect twice), or a Try effect after its branch's Cancel (the barrier's empty
  rollback);
- stuck: a transaction neither confirmed nor cancelled once the run waited;
- contradicted: a transaction whose commit the initiator saw taken and that ended
  cancelled, or one it cancelled (or that was refused, failed, or lost its initiator)
  and that ended confirmed, or one the initiator saw begun that the coordinator does
  not have;
- accounts off: a participant whose account does not add up: frozen left over, taken
  not ``QTY`` per confirmed branch, or the total not its start.

The run passes when all five are 0.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from rich.table import Table

from reliable_msg.harness import tcc_party
from reliable_msg.sdk import tcc

from .tcc_plan import QTY, START

#: The statuses a transaction ends in.
FINAL = ("confirmed", "cancelled")
#: What a transaction must end as, given what its initiator saw.
MUST_END = {
    "committed": "confirmed",
    **dict.fromkeys(("cancelled", "refused", "try-failed", "expired", "killed"), "cancelled"),
}


@dataclass(frozen=True, slots=True)
class TccBooks:
    transactions: dict[str, str]  #: status by gid
    branches: dict[str, dict[str, tuple[str, str]]]  #: gid → branch → (participant, status)
    expired: set[str]  #: gids the deadline cancelled
    runs: tcc_party.Tally  #: handler runs per participant, gid, branch and op
    cancelled_first: set[tuple[str, str, str]]  #: (participant, gid, branch): Cancel before Try
    accounts: dict[str, tuple[int, int, int]]  #: (available, frozen, taken) per participant


async def unfinished(service_database_url: str) -> int:
    """Transactions neither confirmed nor cancelled."""
    conn = await asyncpg.connect(service_database_url)
    try:
        n = await conn.fetchval(
            "SELECT count(*) FROM rmsg_tcc_transaction WHERE status <> ALL($1::text[])", FINAL
        )
    finally:
        await conn.close()
    return int(n)


async def read(
    database_url: str, service_database_url: str, participants: Sequence[str]
) -> TccBooks:
    conn = await asyncpg.connect(service_database_url)
    try:
        txs = await conn.fetch("SELECT gid, status FROM rmsg_tcc_transaction")
        rows = await conn.fetch("SELECT gid, branch, participant, status FROM rmsg_tcc_branch")
        expired = await conn.fetch("SELECT DISTINCT gid FROM rmsg_tcc_event WHERE op = 'expire'")
    finally:
        await conn.close()
    branches: dict[str, dict[str, tuple[str, str]]] = {}
    for r in rows:
        branches.setdefault(r["gid"], {})[r["branch"]] = (r["participant"], r["status"])
    conn = await asyncpg.connect(database_url)
    try:
        runs = await tcc_party.tally(conn, participants)
        cancelled_first = set()
        for name in participants:
            sql = (
                f"SELECT gid, branch FROM {tcc_party.schema(name)}.{tcc.BARRIER_TABLE}"
                " WHERE op = 'try' AND origin = 'cancel'"
            )
            cancelled_first |= {(name, r["gid"], r["branch"]) for r in await conn.fetch(sql)}
        accounts = {name: await tcc_party.account(conn, name) for name in participants}
    finally:
        await conn.close()
    return TccBooks(
        transactions={r["gid"]: r["status"] for r in txs},
        branches=branches,
        expired={r["gid"] for r in expired},
        runs=runs,
        cancelled_first=cancelled_first,
        accounts=accounts,
    )


@dataclass(frozen=True, slots=True)
class TccTally:
    transactions: int
    committed: int  #: confirmed
    cancelled: int
    expired: int  #: cancelled by the deadline
    branches: dict[str, int]  #: branches per status
    empty_rollbacks: int  #: Cancels that came before their Try
    initiators: dict[str, int]  #: transactions per what their initiator saw
    killed: int  #: initiators killed between Try and commit
    half_done: int
    twice: int
    stuck: int
    contradicted: int
    accounts_off: int

    @property
    def passed(self) -> bool:
        return not (
            self.half_done or self.twice or self.stuck or self.contradicted or self.accounts_off
        )

    def as_json(self, quiescence: float | None) -> dict[str, Any]:
        return {
            "passed": self.passed and quiescence is not None,
            "transactions": self.transactions,
            "committed": self.committed,
            "cancelled": self.cancelled,
            "expired": self.expired,
            "branches": self.branches,
            "empty_rollbacks": self.empty_rollbacks,
            "initiators": self.initiators,
            "initiators_killed": self.killed,
            "half_done": self.half_done,
            "applied_twice": self.twice,
            "stuck": self.stuck,
            "contradicted": self.contradicted,
            "accounts_off": self.accounts_off,
            "quiescence_seconds": None if quiescence is None else round(quiescence, 1),
        }

    def table(self, quiescence: float | None) -> Table:
        table = Table(title="TCC transactions", title_justify="left")
        table.add_column("")
        table.add_column("found", justify="right")
        table.add_column("must be", justify="right")

        def row(what: str, found: int | str, must: int | None = None) -> None:
            mark = "[red]" if must is not None and found != must else ""
            table.add_row(what, f"{mark}{found}", "" if must is None else str(must))

        seen = ", ".join(f"{n} {what}" for what, n in sorted(self.initiators.items()))
        row("transactions begun", self.transactions)
        row("committed (every branch confirmed)", self.committed)
        row("cancelled (every branch cancelled)", self.cancelled)
        row("  of which by the deadline", self.expired)
        row("what the initiators saw", seen)
        row("initiators killed between Try and commit", self.killed)
        row("empty rollbacks (a Cancel before its Try)", self.empty_rollbacks)
        row("half-done (branches or effects disagree)", self.half_done, 0)
        row("applied twice (an effect twice, a Try after its Cancel)", self.twice, 0)
        row("stuck (not confirmed nor cancelled)", self.stuck, 0)
        row("contradicting their initiator", self.contradicted, 0)
        row("participant accounts off", self.accounts_off, 0)
        quiet = "timed out" if quiescence is None else f"{quiescence:.1f} s"
        row("time to quiescence (from the end of the load)", quiet)
        return table


def tally(books: TccBooks, outcomes: Mapping[str, str]) -> TccTally:
    """Count the outcome from the books and what each initiator saw, by gid."""
    runs = books.runs
    by_branch: dict[tuple[str, str, str], Counter[str]] = {}
    for run, n in runs.items():
        by_branch.setdefault((run.participant, run.gid, run.branch), Counter())[run.op] += n
    twice = sum(n - 1 for _, n in runs.twice())
    twice += sum(1 for key in books.cancelled_first if by_branch.get(key, Counter())["try"])
    known = set()
    half_done = 0
    for gid, status in books.transactions.items():
        branches = books.branches.get(gid, {})
        ends = {s for _, s in branches.values()}
        ok = not {"confirmed", "cancelled"} <= ends
        if status in FINAL:
            ok = ok and ends <= {status}
        for branch, (participant, _) in branches.items():
            key = (participant, gid, branch)
            known.add(key)
            ops = by_branch.get(key, Counter())
            ok = ok and _agrees(status, ops["try"] > 0, ops["confirm"] > 0, ops["cancel"] > 0)
        half_done += not ok
    half_done += len({gid for (_, gid, _) in set(by_branch) - known})
    confirms = Counter(p for (p, _, _), ops in by_branch.items() if ops["confirm"])
    statuses = Counter(books.transactions.values())
    return TccTally(
        transactions=len(books.transactions),
        committed=statuses["confirmed"],
        cancelled=statuses["cancelled"],
        expired=len(books.expired & {g for g, s in books.transactions.items() if s == "cancelled"}),
        branches=dict(Counter(s for b in books.branches.values() for _, s in b.values())),
        empty_rollbacks=len(books.cancelled_first),
        initiators=dict(Counter(outcomes.values())),
        killed=sum(o == "killed" for o in outcomes.values()),
        half_done=half_done,
        twice=twice,
        stuck=sum(n for s, n in statuses.items() if s not in FINAL),
        # each of these outcomes follows a begin the coordinator took: a gid it does not
        # have is one it lost
        contradicted=sum(
            o in MUST_END and books.transactions.get(gid) != MUST_END[o]
            for gid, o in outcomes.items()
        ),
        accounts_off=sum(_off(account, confirms[name]) for name, account in books.accounts.items()),
    )


def _agrees(status: str, tried: bool, confirmed: bool, cancelled: bool) -> bool:
    """Whether a branch's effects agree with its transaction's status."""
    if status == "confirmed":
        return tried and confirmed and not cancelled
    if status == "cancelled":
        return not confirmed and tried == cancelled
    return not (confirmed and cancelled)  # not final: stuck, counted as such


def _off(account: tuple[int, int, int], confirms: int) -> bool:
    available, frozen, taken = account
    return frozen != 0 or taken != QTY * confirms or available + frozen + taken != START
