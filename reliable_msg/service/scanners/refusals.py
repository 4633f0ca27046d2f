"""What a scanner pass logs when something it needs fails: one warning for the publishes
the broker did not take, one line (not a traceback) for a dependency away."""

from __future__ import annotations

import logging

from reliable_msg.errors import TRANSIENT, BrokerError, ReliableMsgError

log = logging.getLogger(__name__)

#: Failures a pass logs in one line: an outage (PostgreSQL, RabbitMQ, Redis) or a refusal
#: of the broker. Anything else is a bug and gets its traceback.
PASS_ERRORS: tuple[type[ReliableMsgError], ...] = (*TRANSIENT, BrokerError)

#: How many refused publishes one warning names; the rest are counted.
WARN_NAMES = 20


def warn_failed(scanner: str, failed: list[tuple[str, BrokerError]]) -> None:
    """One warning for a pass's publishes the broker did not take, by error (each is
    tried again later, or is dead: an error line says so)."""
    if not failed:
        return
    # Named up to a bound: a pass refused wholesale must not log one line of every id.
    by_error: dict[str, list[str]] = {}
    for what, error in failed[:WARN_NAMES]:
        by_error.setdefault(f"{error.code}: {error.message}", []).append(what)
    named = "; ".join(f"{error} ({', '.join(whats)})" for error, whats in by_error.items())
    if len(failed) > WARN_NAMES:
        named += f"; and {len(failed) - WARN_NAMES} more"
    log.warning("%s pass: %d publishes refused or failed: %s", scanner, len(failed), named)
