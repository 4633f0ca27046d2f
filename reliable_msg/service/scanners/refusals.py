"""The one warning a scanner pass logs for the publishes the broker did not take."""

from __future__ import annotations

import logging

from reliable_msg.errors import BrokerError

log = logging.getLogger(__name__)

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
