"""Names and defaults shared by the service, the SDKs and the operators' tools."""

#: Topic exchange every confirmed message is published to (routing key = topic).
EXCHANGE = "rmsg"
#: Exchange that dead-letters rejected deliveries, routing key = group name.
DEAD_LETTER_EXCHANGE = "rmsg.dlx"
#: Prefix of each consumer group's queue: ``rmsg.<group>``.
QUEUE_PREFIX = "rmsg."
#: Suffix of the queue that keeps a group's dead-lettered deliveries.
DEAD_LETTER_SUFFIX = ".dlq"

#: AMQP header carrying the delivery attempt number, starting at 1.
HEADER_ATTEMPT = "x-rmsg-attempt"
#: AMQP header carrying the producer's name.
HEADER_PRODUCER = "x-rmsg-producer"
#: Header names a producer may not set: the service owns them.
RESERVED_HEADER_PREFIX = "x-rmsg-"

#: Longest client-chosen message id.
MAX_ID_LENGTH = 128
#: Longest topic name.
MAX_TOPIC_LENGTH = 255
#: Longest ordering / sharding key.
MAX_KEY_LENGTH = 255
#: RabbitMQ's default ``frame_max``: the largest AMQP frame, a message's content header
#: (its properties and headers) included, that a broker with default settings accepts.
AMQP_FRAME_MAX = 131072
#: Bytes a content header may grow by after prepare (a larger ``x-rmsg-attempt``).
HEADER_GROWTH = 64

#: PostgreSQL advisory lock key held while migrations run (hashtext of the name).
MIGRATION_LOCK_NAME = "reliable_msg.migrate"
#: Table recording which migrations were applied.
MIGRATION_TABLE = "rmsg_schema_migrations"
#: PostgreSQL setting the TCC retention purge sets (``SET LOCAL ... = 'on'``) in its
#: transaction: the only way past the trigger that keeps ``rmsg_tcc_event`` append-only.
TCC_PURGE_SETTING = "rmsg.tcc_purge"
#: AMQP header carrying the message's ordering / sharding key, when it has one.
HEADER_KEY = "x-rmsg-key"

#: Namespace of every Redis key of a deployment (``fallback.namespace``).
REDIS_NAMESPACE = "rmsg"
#: Hash of the degradation switch: mode, by, at, reason. The ``{<ns>}`` hash tag keeps
#: the switch's keys in one Redis Cluster slot.
SWITCH_KEY = "{{{ns}}}:switch"
#: List of the latest switch changes, newest first (JSON each).
SWITCH_HISTORY_KEY = "{{{ns}}}:switch:history"
#: Pub/sub channel announcing each switch change.
SWITCH_CHANNEL = "{{{ns}}}:switch:events"
#: How many switch changes the history keeps.
SWITCH_HISTORY_LENGTH = 100
#: Hash of each consumer group's fallback shard count, written by the service; consumers
#: read it, so that they read every shard the service writes to.
SHARDS_KEY = "{{{ns}}}:shards"
#: Stream of one fallback shard; the hash tag is the shard, so shards spread over a cluster.
FALLBACK_KEY = "{ns}:fb:{{{group}:{shard}}}"
#: Stream of a group's fallback entries no handler can take (no id, payload not JSON, a
#: missing field, unknown topic): the Redis counterpart of the group's ``.dlq`` queue.
FALLBACK_DEAD_KEY = "{ns}:fb:{{{group}:dead}}"
#: Entries a group's dead stream keeps, about (the consumer's default ``dead_maxlen``).
FALLBACK_DEAD_MAXLEN = 10_000
#: Glob patterns matching every key above of one namespace (switch keys, shards).
NAMESPACE_PATTERNS = ("{{{ns}}}:*", "{ns}:fb:*")
#: Consumer group of every fallback stream (each stream belongs to one consumer group).
FALLBACK_READERS = "rmsg"
