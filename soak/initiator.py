"""``python -m soak.initiator GID SERVICE_URL TIMEOUT``: a TCC initiator that begins
``GID`` with a deadline ``TIMEOUT`` seconds away, runs its three Trys, prints ``tried``
and waits, never committing: the soak run kills it there with SIGKILL, and the
coordinator must cancel every branch at the deadline. Its token is in
``SOAK_INITIATOR_TOKEN``.

Exit status (when it is not killed): 1 the transaction failed before its Trys all
answered (then it cancelled it), 2 wrong arguments.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence

from reliable_msg.errors import ReliableMsgError
from reliable_msg.sdk.client import RetryPolicy
from reliable_msg.sdk.tcc import Branch, Initiator

from .tcc_plan import PARTICIPANTS, QTY

#: The line it prints once every Try answered.
TRIED = "tried"
#: Each Try's bound, connect to last byte.
TRY_TIMEOUT = 5.0
#: The calls to the coordinator are retried through its outages for this long.
RETRY = RetryPolicy(attempts=40, initial=0.1, max_wait=1.0, deadline=60.0)


def branches(payloads: Sequence[tuple[str, object]]) -> list[Branch]:
    """One branch per (participant, payload), named like its participant."""
    return [Branch(participant, participant, payload) for participant, payload in payloads]


async def tried_and_waiting(gid: str, url: str, deadline: float, token: str) -> None:
    """Begin ``gid`` (its deadline ``deadline`` seconds away), run its Trys, wait."""
    async with Initiator(url, token=token, retry=RETRY, try_timeout=TRY_TIMEOUT) as tcc:
        async with tcc.transaction(gid, timeout=deadline) as tx:
            await tx.try_all(branches([(p, {"qty": QTY}) for p in PARTICIPANTS]))
            print(TRIED, flush=True)
            await asyncio.sleep(3600)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or "SOAK_INITIATOR_TOKEN" not in os.environ:
        print(__doc__, file=sys.stderr)
        return 2
    gid, url, timeout = argv
    try:
        asyncio.run(tried_and_waiting(gid, url, float(timeout), os.environ["SOAK_INITIATOR_TOKEN"]))
    except ReliableMsgError as exc:
        print(f"{gid}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
