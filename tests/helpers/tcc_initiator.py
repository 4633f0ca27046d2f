"""A TCC initiator in a process of its own, for the test that kills it with SIGKILL.

    python -m tests.helpers.tcc_initiator GID ORDER_ID
        begins GID (timeout: $TIMEOUT seconds), runs the Trys of paying ORDER_ID
        (tests/helpers/tcc_shop.py), prints "tried", then sleeps before its commit.

$SERVICE is the coordinator's URL, $TOKEN the producer token of the initiator.
"""

from __future__ import annotations

import asyncio
import os
import sys

from reliable_msg.sdk.tcc import Initiator
from tests.helpers.tcc_shop import branches


async def begin_try_and_sleep(gid: str, order_id: int) -> None:
    async with Initiator(os.environ["SERVICE"], os.environ["TOKEN"]) as tcc:
        async with tcc.transaction(gid, timeout=float(os.environ["TIMEOUT"])) as tx:
            await tx.try_all(branches(order_id))
            print("tried", flush=True)
            await asyncio.sleep(3600)  # killed here: never commits


if __name__ == "__main__":
    asyncio.run(begin_try_and_sleep(sys.argv[1], int(sys.argv[2])))
