"""The TCC state machine: exactly the moves of DESIGN.md §11, and their guards."""

from __future__ import annotations

import itertools

import pytest

from reliable_msg.service.tcc.states import (
    BRANCH_CANCEL,
    BRANCH_CONFIRM,
    BRANCH_FINAL,
    BRANCH_MOVES,
    BRANCH_TRANSITIONS,
    CANCEL,
    CANCELLED,
    COMMIT,
    CONFIRMED,
    DRIVEN,
    EXPIRE,
    TX_FINAL,
    TX_MOVES,
    TX_TRANSITIONS,
    BranchStatus,
    IllegalTransition,
    TxStatus,
    branch_move,
    check_values,
    tx_move,
)
from reliable_msg.tcc import Op

T = TxStatus
B = BranchStatus

ALLOWED_TX = {
    (T.TRYING, T.CONFIRMING),
    (T.TRYING, T.CANCELLING),
    (T.CONFIRMING, T.CONFIRMED),
    (T.CANCELLING, T.CANCELLED),
}
ALLOWED_BRANCH = {(B.REGISTERED, B.CONFIRMED), (B.REGISTERED, B.CANCELLED)}


def test_the_named_moves() -> None:
    assert [(m.src, m.dst) for m in TX_MOVES] == [
        (T.TRYING, T.CONFIRMING),  # COMMIT
        (T.TRYING, T.CANCELLING),  # CANCEL
        (T.TRYING, T.CANCELLING),  # EXPIRE
        (T.CONFIRMING, T.CONFIRMED),  # CONFIRMED
        (T.CANCELLING, T.CANCELLED),  # CANCELLED
    ]
    assert TX_MOVES == (COMMIT, CANCEL, EXPIRE, CONFIRMED, CANCELLED)
    assert BRANCH_MOVES == (BRANCH_CONFIRM, BRANCH_CANCEL)
    assert set(TX_TRANSITIONS) == ALLOWED_TX
    assert set(BRANCH_TRANSITIONS) == ALLOWED_BRANCH
    assert "initiator" in TX_TRANSITIONS[T.TRYING, T.CANCELLING]
    assert "deadline" in TX_TRANSITIONS[T.TRYING, T.CANCELLING]


@pytest.mark.parametrize(("src", "dst"), sorted(ALLOWED_TX))
def test_every_allowed_transaction_move(src: TxStatus, dst: TxStatus) -> None:
    assert tx_move(src, dst) == (src.value, dst.value)


@pytest.mark.parametrize(
    ("src", "dst"),
    [pair for pair in itertools.product(TxStatus, repeat=2) if pair not in ALLOWED_TX],
)
def test_every_forbidden_transaction_move_raises(src: TxStatus, dst: TxStatus) -> None:
    assert (src, dst) not in TX_TRANSITIONS
    with pytest.raises(IllegalTransition, match=f"{src} -> {dst}"):
        tx_move(src, dst)


@pytest.mark.parametrize(("src", "dst"), sorted(ALLOWED_BRANCH))
def test_every_allowed_branch_move(src: BranchStatus, dst: BranchStatus) -> None:
    assert branch_move(src, dst) == (src.value, dst.value)


@pytest.mark.parametrize(
    ("src", "dst"),
    [pair for pair in itertools.product(BranchStatus, repeat=2) if pair not in ALLOWED_BRANCH],
)
def test_every_forbidden_branch_move_raises(src: BranchStatus, dst: BranchStatus) -> None:
    assert (src, dst) not in BRANCH_TRANSITIONS
    with pytest.raises(IllegalTransition, match=f"{src} -> {dst}"):
        branch_move(src, dst)


def test_confirming_never_turns_into_cancelling() -> None:
    assert (T.CONFIRMING, T.CANCELLING) not in TX_TRANSITIONS
    assert not [m for m in TX_MOVES if m.src is T.CONFIRMING and m.dst is not T.CONFIRMED]
    with pytest.raises(IllegalTransition):
        tx_move(T.CONFIRMING, T.CANCELLING)


@pytest.mark.parametrize("final", sorted(TX_FINAL))
def test_a_final_transaction_has_no_way_out(final: TxStatus) -> None:
    assert not [dst for (src, dst) in TX_TRANSITIONS if src is final]
    for dst in TxStatus:
        with pytest.raises(IllegalTransition):
            tx_move(final, dst)


@pytest.mark.parametrize("final", sorted(BRANCH_FINAL))
def test_a_final_branch_has_no_way_out(final: BranchStatus) -> None:
    assert not [dst for (src, dst) in BRANCH_TRANSITIONS if src is final]
    for dst in BranchStatus:
        with pytest.raises(IllegalTransition):
            branch_move(final, dst)


def test_finals_are_the_statuses_with_no_move_out() -> None:
    assert {s for s in TxStatus if not any(src is s for src, _ in TX_TRANSITIONS)} == TX_FINAL
    assert {
        s for s in BranchStatus if not any(src is s for src, _ in BRANCH_TRANSITIONS)
    } == BRANCH_FINAL


def test_every_status_is_reached_from_the_start() -> None:
    reached = {T.TRYING}
    for _ in TxStatus:
        reached |= {dst for src, dst in TX_TRANSITIONS if src in reached}
    assert reached == set(TxStatus)


def test_guards() -> None:
    assert COMMIT.applies() == "status = 'trying' AND deadline > now()"
    assert EXPIRE.applies() == "status = 'trying' AND deadline <= now()"
    assert CANCEL.applies() == "status = 'trying'"
    assert CONFIRMED.applies().startswith("status = 'confirming' AND NOT EXISTS (")
    assert "b.status <> 'confirmed'" in CONFIRMED.when
    assert "b.status <> 'cancelled'" in CANCELLED.when
    assert "b.gid = rmsg_tcc_transaction.gid" in CANCELLED.when
    assert BRANCH_CONFIRM.applies().startswith("status = 'registered' AND EXISTS (")
    assert "t.status = 'confirming'" in BRANCH_CONFIRM.when
    assert "t.status = 'cancelling'" in BRANCH_CANCEL.when
    assert COMMIT.params == ("trying", "confirming")


def test_the_driver_calls_confirm_while_confirming_and_cancel_while_cancelling() -> None:
    assert DRIVEN == {
        T.CONFIRMING: (Op.CONFIRM, BRANCH_CONFIRM),
        T.CANCELLING: (Op.CANCEL, BRANCH_CANCEL),
    }


def test_check_values() -> None:
    assert check_values(BranchStatus) == "('registered', 'confirmed', 'cancelled')"
    assert check_values(TxStatus).count("'") == 2 * len(TxStatus)
