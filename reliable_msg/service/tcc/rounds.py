"""A round of the TCC driver: the transaction it claimed with the branches due in it,
and the counts behind its gauges; the values its store
(:class:`~reliable_msg.service.tcc.ports.DrivingStore`) hands it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from reliable_msg.service.tcc.states import DRIVEN, BranchStatus, Move, TxStatus
from reliable_msg.tcc import Op


@dataclass(frozen=True, slots=True)
class DueBranch:
    """A registered branch whose Confirm or Cancel is due."""

    branch: str
    participant: str
    payload: Any  #: the JSON registered with it
    attempts: int  #: calls made before this one


@dataclass(frozen=True, slots=True)
class Claimed:
    """A transaction leased to this instance for one round, with its due branches."""

    gid: str
    status: TxStatus
    lease_until: datetime  #: the lease's token: the round's end releases only this lease
    branches: tuple[DueBranch, ...]

    @property
    def op(self) -> Op:
        return DRIVEN[self.status][0]

    @property
    def move(self) -> Move[BranchStatus]:
        return DRIVEN[self.status][1]


@dataclass(frozen=True, slots=True)
class TccCounts:
    """What the ``rmsg_tcc_*`` gauges show, counted in the database."""

    statuses: dict[str, int]  #: transactions per status
    oldest: float  #: seconds since the oldest unfinished transaction began (0: none)
    stalled: int
