"""How the producer SDK's confirms of concurrent transactions share one batch call: the
options, and how a batch answer is read back into each transaction's own outcome."""

from __future__ import annotations

import math
from dataclasses import dataclass

from reliable_msg.errors import ServiceUnavailable
from reliable_msg.sdk.client import ItemResult


@dataclass(frozen=True, slots=True)
class ConfirmBatching:
    """How the confirms of concurrent transactions share one ``POST /v1/batch/confirm``.

    A confirm after a local commit waits up to ``window`` seconds for the confirms of
    other transactions committing meanwhile, up to ``max_batch`` ids in all (at most the
    service's ``max_batch``); at most ``max_running`` calls run at once, and a confirm
    arriving while they do joins the next batch. ``enabled=False``: one call per
    transaction, as the confirm was sent before.
    """

    enabled: bool = True
    window: float = 0.002  #: seconds a batch stays open for more confirms
    max_batch: int = 100  #: ids in one batch call
    max_running: int = 4  #: batch calls in flight at once

    def __post_init__(self) -> None:
        counts = (self.max_batch, self.max_running)
        whole = all(isinstance(n, int) and not isinstance(n, bool) for n in counts)
        window = isinstance(self.window, int | float) and 0 <= self.window < math.inf
        if not (window and whole and self.max_batch >= 1 and self.max_running >= 1):
            raise ValueError(
                "ConfirmBatching needs a finite window >= 0 and whole numbers"
                " max_batch >= 1 and max_running >= 1,"
                f" not {self.window!r}, {self.max_batch!r}, {self.max_running!r}"
            )


def each_asked(ids: list[str], items: list[ItemResult]) -> list[ItemResult]:
    """One result per id asked, in the order asked, matched by id rather than by place.

    A buggy or hostile answer is never taken for another message's outcome nor for a
    confirm: an item for an id not asked is ignored, and an id the answer names not
    exactly once, or whose failed item gives no error, is not confirmed as after an
    outage (its confirm is retried, or check-back finishes it).
    """
    found: dict[str, list[ItemResult]] = {}
    for item in items:
        found.setdefault(item.id, []).append(item)
    results = []
    for id in ids:
        match found.get(id, []):
            case [item] if item.error is not None or item.ok:
                results.append(item)
            case _:
                why = f"the service's batch answer gave no usable result for message {id!r}"
                results.append(ItemResult(id, False, None, None, ServiceUnavailable(why)))
    return results
