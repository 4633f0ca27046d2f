"""The soak's TCC side, its pure parts: the plan of transactions (reproducible, spread
over the payments, the killed initiators inside the run) and the tally, which must see
every kind of wrong books it names."""

from __future__ import annotations

from collections import Counter

from reliable_msg.harness.tcc_party import Run, Tally
from soak.tcc_books import TccBooks, tally
from soak.tcc_plan import PARTICIPANTS, QTY, START, TOO_MUCH, Ending, make_tcc_plan

P1, P2, P3 = PARTICIPANTS


def test_the_same_seed_gives_the_same_transactions() -> None:
    one = make_tcc_plan(500, 5000, crashes=3, seed=1)
    assert one == make_tcc_plan(500, 5000, crashes=3, seed=1)
    assert one != make_tcc_plan(500, 5000, crashes=3, seed=2)
    assert len({tx.gid for tx in one}) == 500


def test_every_ending_comes_up_and_the_killed_ones_fall_inside_the_run() -> None:
    plan = make_tcc_plan(40, 300, crashes=1, seed=5)
    endings = Counter(tx.ending for tx in plan)
    assert set(endings) == set(Ending)
    assert endings[Ending.KILLED] == 1
    killed = next(i for i, tx in enumerate(plan) if tx.ending is Ending.KILLED)
    assert 4 <= killed < 36
    moments = [tx.at for tx in plan]
    assert moments == sorted(moments) and moments[0] == 0 and moments[-1] < 300


def test_a_refused_transaction_asks_too_much_of_one_branch_only() -> None:
    plan = make_tcc_plan(200, 1000, crashes=0, seed=3)
    refused = [tx for tx in plan if tx.ending is Ending.REFUSED]
    assert refused
    for tx in refused:
        qtys = [payload["qty"] for _, payload in tx.payloads()]
        assert sorted(qtys) == [QTY, QTY, TOO_MUCH]
    committing = next(tx for tx in plan if tx.ending is Ending.COMMIT)
    assert committing.payloads() == [(p, {"qty": QTY}) for p in PARTICIPANTS]


def _books(
    transactions: dict[str, str],
    runs: dict[tuple[str, str, str], list[str]],
    *,
    branch_status: dict[str, str] | None = None,
    cancelled_first: set[tuple[str, str, str]] | None = None,
    accounts: dict[str, tuple[int, int, int]] | None = None,
) -> TccBooks:
    """Books of ``transactions`` (gid → status) with a branch at every participant
    (its status the transaction's when final, unless ``branch_status`` says), and the
    handler ``runs`` per (participant, gid, branch)."""
    counted = Tally()
    for (participant, gid, branch), ops in runs.items():
        for op in ops:
            counted[Run(participant, gid, branch, op)] += 1
    final = ("confirmed", "cancelled")
    branches = {
        gid: {
            p: (p, (branch_status or {}).get(f"{gid}/{p}", s if s in final else "registered"))
            for p in PARTICIPANTS
        }
        for gid, s in transactions.items()
    }
    return TccBooks(
        transactions=transactions,
        branches=branches,
        expired=set(),
        runs=counted,
        cancelled_first=cancelled_first or set(),
        accounts=accounts or dict.fromkeys(PARTICIPANTS, (START, 0, 0)),
    )


def _all(gid: str, *ops: str) -> dict[tuple[str, str, str], list[str]]:
    return {(p, gid, p): list(ops) for p in PARTICIPANTS}


def test_clean_books_pass() -> None:
    taken = (START - QTY, 0, QTY)
    books = _books(
        {"a": "confirmed", "b": "cancelled", "c": "cancelled"},
        {**_all("a", "try", "confirm"), **_all("b", "try", "cancel")},  # c: no Try ran
        cancelled_first={(p, "c", p) for p in PARTICIPANTS},
        accounts=dict.fromkeys(PARTICIPANTS, taken),
    )
    t = tally(books, {"a": "committed", "b": "cancelled", "c": "try-failed"})
    assert (t.committed, t.cancelled, t.empty_rollbacks) == (1, 2, 3)
    assert (t.half_done, t.twice, t.stuck, t.contradicted, t.accounts_off) == (0, 0, 0, 0, 0)
    assert t.passed


def test_half_done_transactions_are_seen() -> None:
    runs = {
        **_all("mixed", "try", "confirm"),  # confirmed at the participants...
        **_all("unconfirmed", "try"),  # confirmed, a Try never confirmed
        **_all("kept", "try"),  # cancelled, the Trys never given back
        **_all("stranger", "try"),  # effects of a gid the coordinator never had
    }
    runs[(P3, "unconfirmed", P3)] = ["try", "confirm"]
    books = _books(
        {"mixed": "confirmed", "unconfirmed": "confirmed", "kept": "cancelled"},
        runs,
        branch_status={"mixed/" + P2: "cancelled"},  # ...one branch cancelled here
    )
    t = tally(books, {})
    assert t.half_done == 4
    assert not t.passed


def test_effects_applied_twice_and_a_try_after_its_cancel_are_seen() -> None:
    runs = {**_all("a", "try", "confirm"), **_all("b", "try", "cancel")}
    runs[(P1, "a", P1)] = ["try", "confirm", "confirm"]
    runs[(P2, "b", P2)] = ["try", "try", "cancel", "cancel"]
    runs[(P3, "c", P3)] = ["try"]  # its Cancel came first: an empty rollback
    books = _books(
        {"a": "confirmed", "b": "cancelled", "c": "cancelled"},
        runs,
        cancelled_first={(p, "c", p) for p in PARTICIPANTS},
    )
    t = tally(books, {})
    assert t.twice == 1 + 2 + 1
    assert not t.passed


def test_stuck_contradicted_and_accounts_off_are_seen() -> None:
    books = _books(
        {"a": "confirming", "b": "cancelled", "c": "confirmed", "d": "cancelled"},
        {**_all("a", "try"), **_all("b", "try", "cancel"), **_all("c", "try", "confirm")},
        accounts={P1: (START - QTY, QTY, 0), P2: (START, 0, 0), P3: (START - QTY, 0, QTY)},
    )
    seen = {"b": "committed", "c": "killed", "d": "refused", "e": "committed"}
    t = tally(books, seen)
    assert t.stuck == 1
    # b was committed, c lost its initiator, e was committed and the coordinator lost it
    assert t.contradicted == 3
    # P1: frozen left over; P2: took nothing for c's confirmed branch; P3 is right
    assert t.accounts_off == 2
    assert t.half_done == 0 and t.twice == 0
    assert not t.passed
