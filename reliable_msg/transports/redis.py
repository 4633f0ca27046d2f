"""The Redis fallback: per consumer group, a fixed set of shard streams.

A message for a group goes to shard ``crc32(key or id) % shards`` of that group, a
Redis Stream ``rmsg:fb:{<group>:<shard>}`` (its own hash tag, so shards spread over a
Redis Cluster and no key is hot or big). Consumers read with one stream consumer group
per stream (``XREADGROUP``), so an entry read but not acked stays in the pending list
and is reclaimed (``XAUTOCLAIM``) from a consumer that died; an entry is deleted once
handled and acked to the service. A shard longer than ``shard_alarm`` raises an alarm
(log and metric) at each write that finds it so. An entry no handler can take is moved
to the group's dead stream ``rmsg:fb:{<group>:dead}`` with the reason; that stream keeps
about the latest ``dead_maxlen`` entries.

Every Redis failure leaves this module as :class:`FallbackUnavailable`, chained. The
entries themselves are :mod:`reliable_msg.transports.redis_entries`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ParamSpec, TypeVar

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import (
    CrossSlotTransactionError,
    InvalidPipelineStack,
    RedisClusterException,
    RedisError,
    ResponseError,
)

from reliable_msg import constants
from reliable_msg.errors import FallbackUnavailable
from reliable_msg.message import Publication
from reliable_msg.metrics import FALLBACK_WRITES, SHARD_ALARMS
from reliable_msg.policy import shard_of
from reliable_msg.transports.redis_client import RedisClient, master_clients
from reliable_msg.transports.redis_entries import (
    Entry,
    Read,
    entries,
    entry_fields,
    text,
)

log = logging.getLogger(__name__)

#: What the Redis client raises when Redis fails; caught in this package only, and raised
#: on as :class:`FallbackUnavailable`. RuntimeError too: under uvloop, a write on a
#: pooled connection the peer reset while it was idle raises "the handler is closed" (a
#: RuntimeError), which the Redis client passes on after dropping the connection; the
#: next call connects afresh. A Redis Cluster's client adds its own failures that are not
#: a RedisError (no reachable node, a slot no master covers: RedisClusterException); its
#: ClusterDownError, TryAgainError and MovedError are RedisErrors.
REDIS_FAILURES: tuple[type[BaseException], ...] = (
    RedisError,
    RedisClusterException,
    OSError,
    TimeoutError,
    RuntimeError,
)

#: Seconds before a reader asks again a cluster node that did not answer.
AWAY_RETRY = 2.0

#: RedisClusterExceptions that are a bug of this code, not Redis away: let through.
_MISUSES = (CrossSlotTransactionError, InvalidPipelineStack)

P = ParamSpec("P")
R = TypeVar("R")


def translating(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """The coroutine function ``method``, raising its Redis failures as
    :class:`FallbackUnavailable`."""

    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except _MISUSES:
            raise
        except REDIS_FAILURES as exc:
            raise FallbackUnavailable(str(exc) or repr(exc)) from exc

    return call


@translating
async def ping(redis: RedisClient) -> None:
    """Raise :class:`FallbackUnavailable` unless Redis answers: a cluster, every master
    of it, and it says it serves every slot (``cluster_state:ok``). A plain ``PING``
    goes to one node, which answers while the cluster is down."""
    if not isinstance(redis, RedisCluster):
        await redis.ping()
        return
    await redis.ping(target_nodes=RedisCluster.PRIMARIES)
    info = await redis.cluster_info()
    if info.get("cluster_state") != "ok":
        raise FallbackUnavailable(f"Redis Cluster state {info.get('cluster_state')}")


def shard_key(namespace: str, group: str, shard: int) -> str:
    return constants.FALLBACK_KEY.format(ns=namespace, group=group, shard=shard)


def shard_keys(namespace: str, group: str, shards: int) -> list[str]:
    return [shard_key(namespace, group, i) for i in range(shards)]


class FallbackWriter:
    """Writes messages to their groups' shards (the service side)."""

    def __init__(
        self,
        redis: RedisClient,
        shards: dict[str, int],
        *,
        namespace: str,
        default_shards: int,
        alarm: int,
    ) -> None:
        self._redis = redis
        self._ns = namespace
        self._shards = shards
        self._default = default_shards
        self._alarm = alarm
        self._shards_key = constants.SHARDS_KEY.format(ns=namespace)
        self._recorded = False

    def key_for(self, group: str, out: Publication) -> str:
        shards = self._shards.get(group, self._default)
        return shard_key(self._ns, group, shard_of(out.key or out.id, shards))

    @translating
    async def record_shards(self) -> None:
        """Write each group's shard count where consumers read it (:data:`SHARDS_KEY`)."""
        if self._shards:
            await self._redis.hset(self._shards_key, mapping=self._shards)  # type: ignore[arg-type]
        self._recorded = True

    @translating
    async def write(self, outs: Sequence[Publication]) -> None:
        """Append each message to the shard of each of its groups; return once Redis has
        them all."""
        writes = [(group, self.key_for(group, out), out) for out in outs for group in out.targets()]
        # The shard counts go with this instance's first write, should start-up have
        # found Redis away.
        record = not self._recorded and bool(self._shards)
        async with self._redis.pipeline(transaction=False) as pipe:
            if record:
                pipe.hset(self._shards_key, mapping=self._shards)  # type: ignore[arg-type]
            for _, key, out in writes:
                pipe.xadd(key, entry_fields(out))  # type: ignore[arg-type]
                pipe.xlen(key)
            replies = await pipe.execute()
        if record:
            self._recorded = True
            replies = replies[1:]
        for (group, key, out), length in zip(writes, replies[1::2], strict=True):
            FALLBACK_WRITES.labels(group).inc()
            if length > self._alarm:
                SHARD_ALARMS.labels(group).inc()
                log.warning(
                    "fallback shard %s holds %d entries (alarm at %d); message %s",
                    key,
                    length,
                    self._alarm,
                    out.id,
                    extra={"message_id": out.id},
                )

    @translating
    async def dead(self, group: str) -> int:
        """Entries in the dead stream of ``group``."""
        key = constants.FALLBACK_DEAD_KEY.format(ns=self._ns, group=group)
        return int(await self._redis.xlen(key))

    @translating
    async def depth(self, group: str) -> int:
        """Entries waiting in all shards of ``group``."""
        keys = shard_keys(self._ns, group, self._shards.get(group, self._default))
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.xlen(key)
            lengths = await pipe.execute()
        return int(sum(lengths))


class FallbackReader:
    """Reads a group's shards as one consumer (the consumer SDK side)."""

    def __init__(
        self,
        redis: RedisClient,
        *,
        namespace: str,
        group: str,
        shards: int,
        consumer: str,
        dead_maxlen: int = constants.FALLBACK_DEAD_MAXLEN,
    ) -> None:
        self._redis = redis
        self._dead_maxlen = dead_maxlen
        self._namespace = namespace
        self._group = group
        self._configured = shards
        self._shards_key = constants.SHARDS_KEY.format(ns=namespace)
        self.keys = shard_keys(namespace, group, shards)
        self._consumer = consumer
        #: cluster nodes that did not answer, and when to ask them again
        self._away: dict[str, float] = {}

    @translating
    async def learn_shards(self) -> int:
        """Follow the group's shard count as the service recorded it; the count given to
        the constructor holds until the service has recorded one."""
        raw = await self._redis.hget(self._shards_key, self._group)
        shards = int(raw) if raw is not None else self._configured
        if shards != len(self.keys):
            if shards != self._configured:
                log.warning(
                    "fallback of %s: the service writes to %d shards, not the %d configured "
                    "here; reading %d",
                    self._group,
                    shards,
                    self._configured,
                    shards,
                )
            self.keys = shard_keys(self._namespace, self._group, shards)
        return shards

    @translating
    async def prepare(self, keys: Sequence[str] | None = None) -> None:
        """Create the consumer group of each shard (all, or ``keys``) from the start of
        the stream, so that nothing already in it is skipped. On a cluster, the shards of
        a master that does not answer are left for later (a read that finds no group
        creates it); FallbackUnavailable only if no master answered."""
        replies = await self._each_node(
            self.keys if keys is None else keys,
            lambda pipe, key: pipe.xgroup_create(
                key, constants.FALLBACK_READERS, "0", mkstream=True
            ),
        )
        for reply in replies.values():
            if isinstance(reply, ResponseError) and "BUSYGROUP" not in str(reply):
                raise reply

    @translating
    async def read(self, keys: Sequence[str], count: int) -> list[Read]:
        """New entries of ``keys``, up to ``count`` per key; one round trip (on a
        cluster, one per master, those of a master that does not answer left out)."""
        replies = await self._replies(
            keys,
            lambda pipe, key: pipe.xreadgroup(
                constants.FALLBACK_READERS, self._consumer, {key: ">"}, count=count
            ),
        )
        return [entry for reply in replies.values() for entry in entries(reply)]

    @translating
    async def reclaim(self, keys: Sequence[str], idle: float, count: int) -> list[Read]:
        """Entries read by another consumer and not acked for ``idle`` seconds."""
        replies = await self._replies(
            keys,
            lambda pipe, key: pipe.xautoclaim(
                key,
                constants.FALLBACK_READERS,
                self._consumer,
                min_idle_time=int(idle * 1000),
                count=count,
            ),
        )
        found: list[Read] = []
        for key, reply in replies.items():
            if reply is not None:
                found.extend(Entry.parse(key, text(i), f) for i, f in reply[1] if f)
        return found

    async def _replies(self, keys: Sequence[str], queue: Queue) -> dict[str, Any]:
        """The reply of each key (of the masters that answered), None for a key whose
        stream or consumer group is gone (Redis restarted without persistence, an
        eviction, a flush, a ``XGROUP DESTROY``; the service's next write makes a stream
        without a group), after creating the group again."""
        replies = await self._each_node(keys, queue)
        missing = []
        for key, reply in replies.items():
            if isinstance(reply, ResponseError) and str(reply).startswith("NOGROUP"):
                missing.append(key)
            elif isinstance(reply, Exception):
                raise reply
        if missing:
            log.warning(
                "fallback of %s: no consumer group on %s; creating it again",
                self._group,
                ", ".join(missing),
            )
            await self.prepare(missing)
        return {key: None if key in missing else r for key, r in replies.items()}

    async def _each_node(self, keys: Sequence[str], queue: Queue) -> dict[str, Any]:
        """Queue one command per key and send them, one pipeline per master on a
        cluster (all at once), and return the replies of the masters that answered.
        Every master of a cluster holds some of a worker's shards: in one pipeline, a
        master away would stop the reading of all of them. A master that did not answer
        is asked again only every :data:`AWAY_RETRY` seconds (each failed call costs the
        client's retries). Raises a failure only if no master answered."""
        now = time.monotonic()
        by_node = {
            node: part
            for node, part in (await _by_node(self._redis, keys)).items()
            if self._away.get(node, 0.0) <= now
        }
        if not by_node:
            raise FallbackUnavailable(f"no answer from Redis {', '.join(sorted(self._away))}")
        results = await asyncio.gather(
            *(self._pipeline(part, queue) for part in by_node.values()),
            return_exceptions=True,
        )
        replies: dict[str, Any] = {}
        failure: BaseException | None = None
        for node, result in zip(by_node, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, REDIS_FAILURES) or isinstance(result, _MISUSES):
                    raise result
                failure = failure or result
                self._node_away(node, result)
            else:
                replies.update(result)
                self._node_back(node)
        if failure is not None and not replies:
            raise failure
        return replies

    async def _pipeline(self, keys: Sequence[str], queue: Queue) -> dict[str, Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                queue(pipe, key)
            replies = await pipe.execute(raise_on_error=False)
        return dict(zip(keys, replies, strict=True))

    def _node_away(self, node: str, exc: BaseException) -> None:
        if node == "redis":  # one Redis: nothing else to read
            return
        first = node not in self._away
        self._away[node] = time.monotonic() + AWAY_RETRY
        if first:
            log.warning(
                "fallback of %s: Redis %s does not answer (%s); reading the shards of the "
                "others until it does",
                self._group,
                node,
                exc,
            )

    def _node_back(self, node: str) -> None:
        if self._away.pop(node, None) is not None:
            log.warning("fallback of %s: Redis %s answers again", self._group, node)

    @translating
    async def done(self, entry: Read) -> None:
        """Acknowledge and delete a handled entry."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(entry.stream, constants.FALLBACK_READERS, entry.entry_id)
            pipe.xdel(entry.stream, entry.entry_id)
            await pipe.execute()

    @translating
    async def bury(self, entry: Read, reason: str) -> None:
        """Move an entry no handler can take to the group's dead stream, with the reason
        and where it came from; then acknowledge and delete it. A failure between the two
        leaves it in its shard, to be buried again (so it may be in the dead stream twice).
        The dead stream keeps about the latest ``dead_maxlen`` entries (``MAXLEN ~``: Redis
        trims whole nodes), since the service redelivers such a message until it dies and
        each copy is buried again."""
        dead = {**entry.fields, "dead_reason": reason, "dead_from": entry.stream}
        await self._redis.xadd(
            self.dead_key,
            dead,  # type: ignore[arg-type]
            maxlen=self._dead_maxlen,
            approximate=True,
        )
        await self.done(entry)

    @property
    def dead_key(self) -> str:
        return constants.FALLBACK_DEAD_KEY.format(ns=self._namespace, group=self._group)

    @translating
    async def depth(self) -> int:
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in self.keys:
                pipe.xlen(key)
            return int(sum(await pipe.execute()))


#: Queues the command of one key on a pipeline.
Queue = Callable[[Any, str], Any]


async def _by_node(redis: RedisClient, keys: Sequence[str]) -> dict[str, list[str]]:
    """``keys`` by the cluster node that holds each, as the client's slot map says
    (loaded here if it is not yet; a key of a slot no node serves goes under ``"?"``,
    to fail on its own); one Redis: all of them together."""
    if not isinstance(redis, RedisCluster):
        return {"redis": list(keys)}
    await redis.initialize()
    by_node: dict[str, list[str]] = {}
    for key in keys:
        try:
            node = redis.get_node_from_key(key)
            name = node.name if node is not None else "?"
        except (RedisClusterException, KeyError, IndexError):
            name = "?"
        by_node.setdefault(name, []).append(key)
    return by_node


@translating
async def delete_namespace(redis_url: str, namespace: str) -> None:
    """Delete every key of a deployment's namespace: its switch, switch history and
    fallback shards. For tests and demos that start from nothing; never on a live system.
    Each master is swept by a client of its own, closed whatever happens."""
    patterns = [p.format(ns=namespace) for p in constants.NAMESPACE_PATTERNS]
    clients = await master_clients(redis_url)
    try:
        for client in clients:
            keys = [k for p in patterns async for k in client.scan_iter(match=p, count=1000)]
            # One key a command: a master's keys are in many slots (CROSSSLOT otherwise).
            async with client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.unlink(key)
                await pipe.execute()
    finally:
        for client in clients:
            await client.aclose()
