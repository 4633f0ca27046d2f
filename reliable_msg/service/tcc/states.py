"""The state machine of TCC transactions and their branches, in one place.

Written like :mod:`reliable_msg.states`: every move in the store is a guarded update
(``... WHERE status = <from> AND <when>``) built from the named moves below, so two
coordinator instances, a late commit and the deadline scanner can never move a
transaction backwards or twice. ``confirming`` never turns into ``cancelling``: once a
commit is taken, every branch is confirmed, however long it takes.

Transactions::

    trying --COMMIT (before the deadline)--> confirming --CONFIRMED (every branch)--> confirmed
      |  '--EXPIRE (the deadline passed)--.
      '--CANCEL-------------------------> cancelling --CANCELLED (every branch)--> cancelled

Branches: ``registered --BRANCH_CONFIRM--> confirmed`` while their transaction is
``confirming``, ``registered --BRANCH_CANCEL--> cancelled`` while it is ``cancelling``. A
failed call keeps the branch ``registered`` (attempts, next try and last error change,
the status does not), so it needs no move.

A :attr:`Move.when` is SQL on the row being moved: its own columns unqualified, the other
table by its full name (``rmsg_tcc_transaction`` / ``rmsg_tcc_branch``), so the statement
using it must not alias the table it updates. Deadlines are compared with the database's
``now()``, never the instance's clock.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

from reliable_msg.states import IllegalTransition, Move, checked, transitions
from reliable_msg.tcc import Op

__all__ = [
    "BRANCH_CANCEL",
    "BRANCH_CONFIRM",
    "BRANCH_FINAL",
    "BRANCH_MOVES",
    "BRANCH_TRANSITIONS",
    "CANCEL",
    "CANCELLED",
    "COMMIT",
    "CONFIRMED",
    "DRIVEN",
    "EXPIRE",
    "TX_FINAL",
    "TX_MOVES",
    "TX_TRANSITIONS",
    "BranchStatus",
    "IllegalTransition",
    "Move",
    "TxStatus",
    "branch_move",
    "check_values",
    "tx_move",
]


class TxStatus(StrEnum):
    #: Begun; branches are registered and their Trys run. The initiator may commit or
    #: cancel, and the deadline cancels it if the initiator does neither.
    TRYING = "trying"
    #: Committed: every branch's Confirm is called until it answers 200. No way back.
    CONFIRMING = "confirming"
    #: Every branch confirmed. Final.
    CONFIRMED = "confirmed"
    #: Cancelled by the initiator or by its deadline: every branch's Cancel is called
    #: until it answers 200 (a branch whose Try never ran included: empty rollback).
    CANCELLING = "cancelling"
    #: Every branch cancelled. Final.
    CANCELLED = "cancelled"


class BranchStatus(StrEnum):
    #: Registered by the initiator; its Try may or may not have run; Confirm or Cancel
    #: not yet answered 200.
    REGISTERED = "registered"
    #: Its participant answered 200 to Confirm. Final.
    CONFIRMED = "confirmed"
    #: Its participant answered 200 to Cancel. Final.
    CANCELLED = "cancelled"


T = TxStatus
B = BranchStatus

S = TypeVar("S", TxStatus, BranchStatus)


def _every_branch(status: BranchStatus) -> str:
    return (
        "NOT EXISTS (SELECT 1 FROM rmsg_tcc_branch AS b"
        " WHERE b.gid = rmsg_tcc_transaction.gid"
        f" AND b.status <> '{status.value}')"
    )


def _transaction_is(status: TxStatus) -> str:
    return (
        "EXISTS (SELECT 1 FROM rmsg_tcc_transaction AS t"
        " WHERE t.gid = rmsg_tcc_branch.gid"
        f" AND t.status = '{status.value}')"
    )


# -- transactions --------------------------------------------------------------------------

#: Commit by the initiator, before the deadline (after it, the commit is refused and the
#: transaction expires instead).
COMMIT = Move(T.TRYING, T.CONFIRMING, "commit by the initiator", when="deadline > now()")
#: Cancel by the initiator (a Try refused or failed, or its own step did).
CANCEL = Move(T.TRYING, T.CANCELLING, "cancel by the initiator")
#: The deadline passed while trying: the initiator crashed or took too long.
EXPIRE = Move(T.TRYING, T.CANCELLING, "the deadline passed", when="deadline <= now()")
#: The last branch's Confirm answered 200.
CONFIRMED = Move(
    T.CONFIRMING, T.CONFIRMED, "every branch confirmed", when=_every_branch(B.CONFIRMED)
)
#: The last branch's Cancel answered 200.
CANCELLED = Move(
    T.CANCELLING, T.CANCELLED, "every branch cancelled", when=_every_branch(B.CANCELLED)
)

#: Every transaction move; CANCEL and EXPIRE share their (src, dst), not their reason.
TX_MOVES: tuple[Move[TxStatus], ...] = (COMMIT, CANCEL, EXPIRE, CONFIRMED, CANCELLED)

# -- branches ------------------------------------------------------------------------------

#: Its participant answered 200 to Confirm, while the transaction is confirming.
BRANCH_CONFIRM = Move(
    B.REGISTERED, B.CONFIRMED, "Confirm answered 200", when=_transaction_is(T.CONFIRMING)
)
#: Its participant answered 200 to Cancel, while the transaction is cancelling.
BRANCH_CANCEL = Move(
    B.REGISTERED, B.CANCELLED, "Cancel answered 200", when=_transaction_is(T.CANCELLING)
)

BRANCH_MOVES: tuple[Move[BranchStatus], ...] = (BRANCH_CONFIRM, BRANCH_CANCEL)


#: Every move a transaction may make, and what makes it.
TX_TRANSITIONS: dict[tuple[TxStatus, TxStatus], str] = transitions(TX_MOVES)
#: Every move a branch may make, and what makes it.
BRANCH_TRANSITIONS: dict[tuple[BranchStatus, BranchStatus], str] = transitions(BRANCH_MOVES)

#: Statuses a transaction never leaves except by the retention purge.
TX_FINAL: frozenset[TxStatus] = frozenset({T.CONFIRMED, T.CANCELLED})
#: Statuses a branch never leaves.
BRANCH_FINAL: frozenset[BranchStatus] = frozenset({B.CONFIRMED, B.CANCELLED})

#: The call the driver makes on every ``registered`` branch of a transaction in this
#: status, and the branch move a 200 makes.
DRIVEN: dict[TxStatus, tuple[Op, Move[BranchStatus]]] = {
    T.CONFIRMING: (Op.CONFIRM, BRANCH_CONFIRM),
    T.CANCELLING: (Op.CANCEL, BRANCH_CANCEL),
}


def tx_move(src: TxStatus, dst: TxStatus) -> tuple[str, str]:
    return checked(TX_TRANSITIONS, "tcc transaction", src, dst)


def branch_move(src: BranchStatus, dst: BranchStatus) -> tuple[str, str]:
    return checked(BRANCH_TRANSITIONS, "tcc branch", src, dst)


def check_values(statuses: type[TxStatus] | type[BranchStatus]) -> str:
    """The statuses as an SQL list, ``('a', 'b')``: what the tables' CHECK allows."""
    return "(" + ", ".join(f"'{s.value}'" for s in statuses) + ")"
