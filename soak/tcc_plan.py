"""The TCC transactions of a soak run, and what each initiator does: a pure function of
the count, the crashes and a seed, as :mod:`soak.plan` is for the payments.

Each transaction has three branches, one at each participant (:data:`PARTICIPANTS`),
and starts at a moment of the payments (once ``at`` payments have been started), so
that the environment's faults land on transactions in flight too. Its initiator:

- commits (most of them);
- cancels after its Trys (a business decision: the customer gave up);
- has one Try refused (the branch asks more than the participant has);
- or is killed with SIGKILL between its Trys and its commit (``--crashes`` of them):
  the coordinator cancels the transaction at its deadline.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum

#: The participants, one branch at each per transaction (the seed's inventory freezing
#: stock, credit preparing points, wms creating a delivery order: one shape here).
PARTICIPANTS = ("stock", "points", "delivery")
#: What a branch's Try freezes (and its Confirm takes) at its participant.
QTY = 2
#: A Try asking this much is refused: no participant ever holds it.
TOO_MUCH = 2**30
#: Each participant's account at the start: enough for every Try of the longest run.
START = 10**8
#: Shares of the transactions (besides the killed initiators) that cancel, and that
#: have a Try refused; the rest commit.
CANCEL_SHARE, REFUSE_SHARE = 0.15, 0.15


class Ending(StrEnum):
    """What the initiator of a transaction does."""

    COMMIT = "commit"
    CANCEL = "cancel"
    REFUSED = "refused"
    KILLED = "killed"  #: its process killed between its Trys and its commit


@dataclass(frozen=True, slots=True)
class Transaction:
    gid: str
    ending: Ending
    at: int  #: started once this many payments have been started
    refused: int  #: the branch whose Try is refused (:attr:`Ending.REFUSED` only)

    def payloads(self) -> list[tuple[str, dict[str, int]]]:
        """(participant, payload) of each branch, in :data:`PARTICIPANTS` order."""
        return [
            (p, {"qty": TOO_MUCH if self.ending is Ending.REFUSED and i == self.refused else QTY})
            for i, p in enumerate(PARTICIPANTS)
        ]


def make_tcc_plan(count: int, payments: int, *, crashes: int, seed: int) -> list[Transaction]:
    """``count`` transactions spread evenly over ``payments``, by start; ``crashes`` of
    them (as far as ``count`` goes) killed between Try and commit, none in the first
    or last tenth of the run."""
    rng = random.Random(f"{seed}:tcc")
    endings = [_ending(rng) for _ in range(count)]
    inner = range(count // 10, count - count // 10) or range(count)
    for i in rng.sample(inner, min(crashes, len(inner))):
        endings[i] = Ending.KILLED
    step = payments / max(1, count)
    return [
        Transaction(f"soak-{seed}-{i}", ending, int(i * step), rng.randrange(len(PARTICIPANTS)))
        for i, ending in enumerate(endings)
    ]


def _ending(rng: random.Random) -> Ending:
    draw = rng.random()
    if draw < CANCEL_SHARE:
        return Ending.CANCEL
    if draw < CANCEL_SHARE + REFUSE_SHARE:
        return Ending.REFUSED
    return Ending.COMMIT
