"""Prometheus metrics of the service; ``/metrics`` exposes the default registry."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

TRANSITIONS = Counter("rmsg_transitions_total", "Messages moved into a status", ["status"])
PUBLISH_SECONDS = Histogram(
    "rmsg_publish_seconds",
    "Time from publish to broker confirm",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
PUBLISH_REFUSALS = Counter(
    "rmsg_publish_refusals_total",
    "Publishes RabbitMQ refused while it was up: no queue took them (unroutable), or the "
    "message can never go on AMQP (unpublishable)",
    ["reason"],
)
CHECKBACKS = Counter(
    "rmsg_checkbacks_total", "Check-back calls by outcome", ["producer", "outcome"]
)
REDELIVERIES = Counter("rmsg_redeliveries_total", "Deliveries republished", ["group"])
DEAD = Counter("rmsg_dead_total", "Messages or deliveries that went dead", ["reason"])
SCANNER_ERRORS = Counter("rmsg_scanner_errors_total", "Scanner passes that failed", ["job"])
MODE = Gauge("rmsg_degraded", "1 while this instance sees the switch degraded, else 0")
MODE_CHANGES = Counter("rmsg_mode_changes_total", "Switch flips made by this instance", ["mode"])
FALLBACK_WRITES = Counter(
    "rmsg_fallback_writes_total", "Entries written to the Redis fallback", ["group"]
)
FALLBACK_DEPTH = Gauge("rmsg_fallback_depth", "Entries in a group's fallback shards", ["group"])
FALLBACK_DEAD = Gauge(
    "rmsg_fallback_dead_entries",
    "Entries in a group's fallback dead stream (entries no handler could take)",
    ["group"],
)
SHARD_ALARMS = Counter(
    "rmsg_fallback_shard_alarms_total", "Writes that found a shard over the alarm", ["group"]
)
CONFIRM_SECONDS = Histogram(
    "rmsg_confirm_seconds",
    "Time of one confirm run (update, publish, commit; one shared run under group commit), "
    "by who confirms",
    ["caller"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
ACKS = Counter("rmsg_acks_total", "Deliveries acked by their consumer group", ["group"])
MESSAGES = Gauge("rmsg_messages", "Messages by status, counted in the database", ["status"])
DELIVERIES = Gauge(
    "rmsg_deliveries",
    "Deliveries by group and status, counted in the database",
    ["group", "status"],
)
SCANNER_LAG = Gauge(
    "rmsg_scanner_lag_seconds", "Age of the oldest row due to a scanner (0: none due)", ["scanner"]
)
RATE_LIMITED = Counter(
    "rmsg_rate_limited_total", "API requests refused by the rate limit", ["role"]
)
TCC_TRANSACTIONS = Gauge(
    "rmsg_tcc_transactions", "TCC transactions by status, counted in the database", ["status"]
)
TCC_BRANCH_CALLS = Counter(
    "rmsg_tcc_branch_calls_total",
    "Confirm and Cancel calls this instance made to participants, by op and outcome "
    "(ok: 2xx; failed: any other answer, or none)",
    ["op", "outcome"],
)
TCC_OLDEST_UNFINISHED = Gauge(
    "rmsg_tcc_oldest_unfinished_seconds",
    "Age of the oldest TCC transaction not yet confirmed or cancelled (0: none)",
)
TCC_STALLED = Gauge(
    "rmsg_tcc_stalled",
    "TCC transactions confirming or cancelling for longer than tcc.stalled_after",
)
GROUP_COMMIT_SIZE = Histogram(
    "rmsg_group_commit_messages",
    "Messages in one shared statement of the API's group commit, by operation",
    ["op"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
