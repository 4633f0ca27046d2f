"""What the soak run injects, and when: a pure function of the order count, the fault
count and a seed, so that a run can be repeated exactly.

A moment is a position in the sequence of payments: fault ``i`` starts once ``at``
payments have been started (and the fault before it has ended), so faults always land
under load, whatever the machine's speed.

Faults of two sorts:

- per order, carried by the payment itself: the order service killed between its commit
  and its confirm (``crash=after_commit``), a consumer killed between its effect and its
  ack (the consumer is told the order ids at start); and about one payment in ten whose
  local transaction fails (no fault: the message must be cancelled);
- of the environment, started by the run at their moment: see :class:`Kind`.

The TCC transactions that run beside the payments have a plan of their own
(:mod:`soak.tcc_plan`); the faults aimed at their participants are kinds here.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from demo import plan as orders

from .tcc_plan import PARTICIPANTS

#: Fewest orders a plan can place its faults among.
MIN_ORDERS = 20


class Kind(StrEnum):
    """An environment fault."""

    #: SIGKILL of one of the two service instances; the supervisor restarts it.
    KILL_INSTANCE = "kill-instance"
    #: ``rabbitmqctl close_all_connections``: every AMQP connection dropped by the broker.
    CLOSE_CONNECTIONS = "close-connections"
    #: ``rabbitmqctl stop_app``, a few seconds down, ``start_app``.
    BROKER_RESTART = "broker-restart"
    #: ``pg_terminate_backend`` of every connection to the service's and the demo's
    #: databases.
    PG_TERMINATE = "pg-terminate"
    #: The PostgreSQL server restarted (once per run).
    PG_RESTART = "pg-restart"
    #: The proxy between the services and RabbitMQ stops forwarding for a few seconds.
    PROXY_STALL = "proxy-stall"
    #: The proxy between the services and RabbitMQ resets every connection.
    PROXY_CUT = "proxy-cut"
    #: SIGKILL of one of the TCC participants' servers; the supervisor restarts it.
    KILL_PARTICIPANT = "kill-participant"
    #: The proxy in front of a TCC participant (the coordinator's Confirms and Cancels,
    #: the initiators' Trys) stops forwarding for a few seconds.
    PARTICIPANT_STALL = "participant-stall"
    #: The proxy in front of a TCC participant resets every connection.
    PARTICIPANT_CUT = "participant-cut"


#: The kinds that hit the TCC participants: planned only when TCC transactions run.
TCC_KINDS = (Kind.KILL_PARTICIPANT, Kind.PARTICIPANT_STALL, Kind.PARTICIPANT_CUT)


#: How often each kind comes up in a draw, after each has come up once. The server
#: restart comes once only.
WEIGHTS = {
    Kind.KILL_INSTANCE: 3,
    Kind.CLOSE_CONNECTIONS: 2,
    Kind.BROKER_RESTART: 1,
    Kind.PG_TERMINATE: 2,
    Kind.PG_RESTART: 0,
    Kind.PROXY_STALL: 2,
    Kind.PROXY_CUT: 2,
    Kind.KILL_PARTICIPANT: 2,
    Kind.PARTICIPANT_STALL: 2,
    Kind.PARTICIPANT_CUT: 1,
}
#: Seconds a stall or a broker stop lasts: drawn between these.
HOLD = (1.0, 6.0)
#: The kinds whose fault lasts ``hold`` seconds.
HELD = (Kind.BROKER_RESTART, Kind.PROXY_STALL, Kind.PARTICIPANT_STALL)
#: Service instances.
INSTANCES = 2
#: A fault's target is drawn below this and taken modulo the count of its kind's
#: targets: the service instances, the participants.
TARGETS = INSTANCES * len(PARTICIPANTS)


@dataclass(frozen=True, slots=True)
class Fault:
    at: int  #: started once this many payments have been started
    kind: Kind
    hold: float  #: seconds a stall or a broker stop lasts (other kinds: unused)
    target: int  #: which instance or participant it hits, modulo their count

    @property
    def label(self) -> str:
        held = f" ({self.hold:.1f} s)" if self.kind in HELD else ""
        return f"{self.kind}{self.where}{held}"

    @property
    def where(self) -> str:
        """Whom the fault hits, when it is one of several: `` #1``, `` points``."""
        if self.kind is Kind.KILL_INSTANCE:
            return f" #{self.target % INSTANCES}"
        if self.kind in TCC_KINDS:
            return f" {PARTICIPANTS[self.target % len(PARTICIPANTS)]}"
        return ""


@dataclass(frozen=True, slots=True)
class Plan(orders.Plan):
    """The demo's per-order failures (:class:`demo.plan.Plan`) and the environment's."""

    faults: list[Fault]  #: by ``at``

    @property
    def injected(self) -> int:
        """Every fault the plan injects, of both sorts."""
        crashes = sum(len(ids) for ids in self.consumer_crashes.values())
        return len(self.faults) + len(self.upstream_crashes) + crashes


def make_plan(
    order_ids: Sequence[int],
    groups: Sequence[str],
    *,
    faults: int,
    crashes: int,
    seed: int,
    kinds: Sequence[Kind] = tuple(Kind),
) -> Plan:
    """The demo's plan with ``crashes`` of each process, and ``faults`` environment
    faults of ``kinds`` (each kind once before any twice, the server restart once)
    spread evenly at random over the payments."""
    if len(order_ids) < MIN_ORDERS:
        raise ValueError(f"a soak plan needs at least {MIN_ORDERS} orders")
    base = orders.make_plan(order_ids, groups, seed, crashes=crashes)
    rng = random.Random(f"{seed}:faults")
    return Plan(
        local_failures=base.local_failures,
        upstream_crashes=base.upstream_crashes,
        consumer_crashes=base.consumer_crashes,
        faults=_faults(rng, len(order_ids), faults, kinds),
    )


def _faults(rng: random.Random, orders: int, count: int, kinds: Sequence[Kind]) -> list[Fault]:
    drawn = _kinds(rng, count, kinds)
    # One fault per slice of the payments, at a random point of its slice, none in the
    # first or last twentieth (the run is warming up, or the load is gone).
    start, end = orders // 20, orders - orders // 20
    width = max(1, (end - start) // max(1, count))
    faults = []
    for i, kind in enumerate(drawn):
        at = min(end, start + i * width + rng.randrange(width))
        faults.append(Fault(at, kind, round(rng.uniform(*HOLD), 1), rng.randrange(TARGETS)))
    return faults


def _kinds(rng: random.Random, count: int, kinds: Sequence[Kind]) -> list[Kind]:
    """Every kind once (as far as ``count`` goes), then weighted draws; shuffled."""
    first = list(kinds)[:count]
    repeatable = [k for k in kinds if WEIGHTS[k] > 0]
    rest = (
        rng.choices(repeatable, weights=[WEIGHTS[k] for k in repeatable], k=count - len(first))
        if repeatable
        else []
    )
    drawn = first + rest
    rng.shuffle(drawn)
    return drawn
