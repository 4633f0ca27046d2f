"""The consumer SDK: each message has exactly one effect in the consumer's database.

::

    consumer = Consumer("inventory", service_url=URL, token=TOKEN, amqp_url=AMQP, pool=pool)

    @consumer.handler("order.paid")
    async def reserve(conn, message):
        await conn.execute("UPDATE stock SET available = available - $1 ...", ...)

    await consumer.run()  # until SIGTERM or consumer.request_stop()

``amqp_url`` is one RabbitMQ URL or the nodes of one cluster (a list, or one string of
URLs separated by commas); after a failed attach or a lost connection the consumer
attaches through the next node.

A handler runs inside a transaction of ``conn`` that also inserts an *inbox* row keyed
by (group, message id); a redelivered message finds its row and is not handled again.
After the commit the message is acked to the service (in batches), and only then at its
source. A handler that raises rolls back; the message is left to the service's
redelivery (with its backoff) and the error is logged with the message id. A delivery no
handler can take is dead at its source.

The modules, one concept each:

- :mod:`.consumer`: the :class:`Consumer`: handlers, run loop, mode;
- :mod:`.source`: what can be done with a message at its source (ack, retry, reject),
  implemented by :mod:`.amqp` (the group's RabbitMQ queue) and :mod:`.fallback` (the
  group's Redis fallback shards, while degraded);
- :mod:`.settle`: the one decision of what becomes of a message: ack, retry or dead;
- :mod:`.inbox`: the inbox table and the shared handler transactions;
- :mod:`.acks`: acks to the service in batches, then at the sources;
- :mod:`.message`: :class:`Received`, :data:`Handler` and :class:`Poison`.
"""

from ._log import log as log
from .acks import ACK_AGAIN, MAX_ACK_TRIES, RELEASE_AT_ONCE, AckBatcher
from .consumer import STOP_TIMEOUT, Consumer
from .fallback import REDIS_TIMEOUT, FallbackDrain
from .inbox import (
    INBOX_DDL,
    INBOX_TABLE,
    PURGE_AGE,
    Conn,
    SharedTransactions,
    install,
    purge_inbox,
)
from .message import Handler, Poison, Received
from .settle import Outcome, Verdict
from .source import Source

__all__ = [
    "ACK_AGAIN",
    "INBOX_DDL",
    "INBOX_TABLE",
    "MAX_ACK_TRIES",
    "PURGE_AGE",
    "REDIS_TIMEOUT",
    "RELEASE_AT_ONCE",
    "STOP_TIMEOUT",
    "AckBatcher",
    "Conn",
    "Consumer",
    "FallbackDrain",
    "Handler",
    "Outcome",
    "Poison",
    "Received",
    "SharedTransactions",
    "Source",
    "Verdict",
    "install",
    "purge_inbox",
]
