"""The PostgreSQL store: every SQL statement of the service lives in this package.

State moves are guarded updates built from :mod:`reliable_msg.states`. The moves that
must publish inside the database transaction (confirm, redelivery, requeue) are handed
the one :data:`~reliable_msg.service.ports.Publish`, so the transaction stays here and
the broker policy stays in the use-cases. One module per part of the schema's life:

- ``connection``: the pool, and asyncpg's errors translated to ``StoreError``
- ``rows``: rows to the core's values
- ``messages``: prepare, confirm, refused publishes, cancel
- ``deliveries``: acks and redelivery
- ``checkback``: claims and failed check-backs
- ``requeue``: dead messages brought back
- ``reads``: get, page, stats, history
- ``history``: a message's history, its rows merged with the moves its times record
- ``maintenance``: purge, freed ids, scanner lag
"""

from __future__ import annotations

from reliable_msg.service.store.checkback import CLAIM_CHECKS, CheckBacks
from reliable_msg.service.store.deliveries import CLAIM_DELIVERIES, Deliveries
from reliable_msg.service.store.maintenance import Maintenance
from reliable_msg.service.store.messages import Messages
from reliable_msg.service.store.reads import Reads
from reliable_msg.service.store.requeue import Requeues

__all__ = ["CLAIM_CHECKS", "CLAIM_DELIVERIES", "PgStore"]


class PgStore(Messages, Deliveries, CheckBacks, Requeues, Reads, Maintenance):
    """Messages and deliveries in PostgreSQL, through an asyncpg pool; implements
    :class:`~reliable_msg.service.ports.Store`. Open with :meth:`connect`."""
