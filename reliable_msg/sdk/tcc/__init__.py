"""The TCC SDKs: the participant's, where each branch's Try, Confirm and Cancel has
exactly one effect in the participant's database, whatever the coordinator's retries and
the network do; and the initiator's, which begins a global transaction, runs its Trys and
commits or cancels it (:mod:`.initiator`).

::

    await reliable_msg.sdk.tcc.install(conn)  # the barrier table, once
    p = Participant(pool, TOKEN, name="inventory")

    @p.on_try
    async def freeze(conn, call):
        ...  # raise Refused("out of stock") to refuse

    @p.on_confirm
    async def take(conn, call): ...

    @p.on_cancel
    async def give_back(conn, call): ...

    app.include_router(p.router("/tcc/inventory"))

Each call runs its handler in one transaction of the participant's pool together with a
barrier row keyed by (gid, branch, op): Confirm and Cancel are idempotent, a Cancel
whose Try never came is recorded with no effect (empty rollback), a Try after its Cancel
is refused with no effect (anti-hanging), and concurrent duplicates wait on the key and
never run twice. The wire contract is :mod:`reliable_msg.tcc`.

The modules, one concept each:

- :mod:`.initiator`: the :class:`Initiator` and its :class:`GlobalTransaction` block;
- :mod:`.participant`: the :class:`Participant`: handlers, router, answers;
- :mod:`.barrier`: the barrier table, the barrier's one decision, and its purge;
- :mod:`.call`: :class:`Call` and the checks that make one of an HTTP request.
"""

from reliable_msg.errors import Refused, TryFailed, TryRefused
from reliable_msg.tcc import Op

from .barrier import BARRIER_DDL, BARRIER_TABLE, PURGE_AGE, Passage, install, purge_barriers
from .call import MAX_ID_LENGTH, Call
from .initiator import Branch, GlobalTransaction, Initiator
from .participant import MAX_BODY, Handler, Participant

__all__ = [
    "BARRIER_DDL",
    "BARRIER_TABLE",
    "MAX_BODY",
    "MAX_ID_LENGTH",
    "PURGE_AGE",
    "Branch",
    "Call",
    "GlobalTransaction",
    "Handler",
    "Initiator",
    "Op",
    "Participant",
    "Passage",
    "Refused",
    "TryFailed",
    "TryRefused",
    "install",
    "purge_barriers",
]
