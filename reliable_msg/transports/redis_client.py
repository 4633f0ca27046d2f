"""The one place a Redis client is built from a ``redis_url``.

``redis://host:port/db``, ``rediss://...`` and ``unix://path`` name one Redis and give
a :class:`redis.asyncio.Redis`. A Redis Cluster is named by its nodes, any reachable one
of which seeds the cluster map::

    redis+cluster://[user:password@]host:port[,host:port...][/0][?options]
    rediss+cluster://...                         (TLS)

and gives a :class:`redis.asyncio.cluster.RedisCluster`. A cluster has database 0 only.
The options are those of a plain ``redis://`` URL (``socket_timeout=2``, ``ssl_ca_certs=``
...), for every node; keyword arguments of :func:`redis_client` come second to them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis._parsers.commands import AsyncCommandsParser
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.exceptions import ConnectionError, RedisClusterException, RedisError, TimeoutError

#: A client of one Redis or of a Redis Cluster: the commands this project uses are the
#: same on both (the keys that must be together share a hash tag).
RedisClient = aioredis.Redis | RedisCluster

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
PLAIN_SCHEMES = ("redis", "rediss", "unix")
DEFAULT_PORT = 6379


@dataclass(frozen=True)
class ClusterURL:
    """A ``redis+cluster://`` URL, read."""

    nodes: tuple[tuple[str, int], ...]
    #: connection options for every node (credentials, TLS, timeouts)
    options: dict[str, Any] = field(default_factory=dict)


async def master_clients(url: str) -> list[aioredis.Redis]:
    """A plain client of each master of the Redis Cluster ``url`` names (of the one Redis
    of a plain URL), for the caller to close; the masters as the first seed that answers
    lists them (``CLUSTER NODES``), the last seed's error if none does.

    For a sweep over every master that leaves nothing open when one is down: redis-py's
    cluster client, sending a command to every master and one of them failing, leaves
    the others' connections open (a ResourceWarning later, in whatever runs next)."""
    if not is_cluster_url(url):
        return [aioredis.Redis.from_url(url)]
    parsed = parse_cluster_url(url)
    failure = RedisError(f"no seed in {_safe(url)!r}")
    for host, port in parsed.nodes:
        async with aioredis.Redis(host=host, port=port, **parsed.options) as seed:
            try:
                table = await seed.cluster("NODES")
            except RedisError as exc:
                failure = exc
                continue
        masters = sorted(a for a, node in table.items() if "master" in node["flags"].split(","))
        return [
            aioredis.Redis(
                host=a.rsplit(":", 1)[0], port=int(a.rsplit(":", 1)[1]), **parsed.options
            )
            for a in masters
        ]
    raise failure


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def parse_cluster_url(url: str) -> ClusterURL:
    """The seed nodes and options of a cluster URL; ValueError saying what is wrong."""
    scheme, sep, rest = url.partition("://")
    base = CLUSTER_SCHEMES.get(scheme.lower())
    if not sep or base is None:
        raise ValueError(
            f"not a Redis Cluster URL (redis+cluster:// or rediss+cluster://): {_safe(url)!r}"
        )
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    if slash and path not in ("", "0"):
        raise ValueError(
            f"a Redis Cluster has database 0 only; {_safe(url)!r} names database {path!r}"
        )
    userinfo, at, hosts = netloc.rpartition("@")
    nodes = tuple(_node(text, url) for text in hosts.split(","))
    if len(set(nodes)) != len(nodes):
        raise ValueError(f"a node is named twice in {_safe(url)!r}")
    # The options, credentials and TLS as redis-py reads them from a one-node URL.
    one = f"{base}://{userinfo}{at}localhost/{'?' + query if query else ''}"
    options: dict[str, Any] = dict(parse_url(one))
    options.pop("host", None)
    options.pop("port", None)
    if int(options.pop("db", 0) or 0) != 0:
        raise ValueError(f"a Redis Cluster has database 0 only: {_safe(url)!r}")
    if options.pop("connection_class", None) is SSLConnection:
        options["ssl"] = True
    return ClusterURL(nodes, options)


def _node(text: str, url: str) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):  # [IPv6]:port
        host, close, after = text[1:].partition("]")
        if not close or (after and not after.startswith(":")):
            raise ValueError(f"bad node {text!r} in {_safe(url)!r}")
        port_text = after[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            host, port_text = text, ""
    if not host:
        raise ValueError(f"a node without a host in {_safe(url)!r} (host:port,host:port...)")
    try:
        port = int(port_text) if port_text else DEFAULT_PORT
    except ValueError:
        raise ValueError(f"bad port {port_text!r} of node {text!r} in {_safe(url)!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"bad port {port} of node {text!r} in {_safe(url)!r}")
    return unquote(host), port


def check_redis_url(url: str) -> str:
    """``url`` if :func:`redis_client` takes it; ValueError with the reason if not (and
    without the password, even one that is not percent-encoded). Nothing is connected."""
    try:
        if is_cluster_url(url):
            parse_cluster_url(url)
            return url
        scheme = url.partition("://")[0].lower()
        if "://" not in url or scheme not in PLAIN_SCHEMES:
            raise ValueError(
                f"redis_url must be redis://, rediss://, unix://, redis+cluster:// or "
                f"rediss+cluster://, not {_safe(url)!r}"
            )
        parse_url(url)
    except ValueError as exc:
        message = _scrub(str(exc), url)
        if message != str(exc):
            raise ValueError(message) from None
        raise
    return url


def redis_client(url: str, **kwargs: Any) -> RedisClient:
    """A client of the Redis or Redis Cluster ``url`` names (it connects on first use);
    ``kwargs`` are connection options (``socket_timeout``, ``decode_responses`` ...)."""
    check_redis_url(url)
    if not is_cluster_url(url):
        return aioredis.Redis.from_url(url, **kwargs)
    parsed = parse_cluster_url(url)
    try:
        client = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in parsed.nodes],
            **{**kwargs, **parsed.options},
        )
    except TypeError as exc:  # an option RedisCluster does not know
        raise ValueError(f"bad option in {_safe(url)!r}: {exc}") from exc
    client.commands_parser = _CommandsParser(client)
    return client


class _CommandsParser(AsyncCommandsParser):
    """redis-py's, asking ``COMMAND`` of the other masters when the first does not answer.

    A cluster client loads its slot map again after a connection error, and then sends
    ``COMMAND`` to the first master of the map; redis-py (8.1) fails the whole reload,
    and so every later call of the client, while that one master is down. With this,
    one master down stops only the keys it holds, and another master becomes the
    client's default node (the one its keyless commands go to)."""

    def __init__(self, client: RedisCluster) -> None:
        super().__init__()
        self._client = client

    async def initialize(self, node: ClusterNode | None = None) -> None:
        first = node or getattr(self, "node", None)
        others = [n for n in self._client.nodes_manager.get_nodes_by_server_type("primary")]
        candidates = [first] if first is not None else []
        candidates += [n for n in others if n is not first]
        failure: BaseException | None = None
        for candidate in candidates:
            try:
                await super().initialize(candidate)
            except (ConnectionError, TimeoutError, OSError) as exc:
                failure = failure or exc
                continue
            if candidate is not first:
                self._client.nodes_manager.default_node = candidate
            return
        if failure is not None:
            raise failure
        await super().initialize(node)


async def pubsub(client: RedisClient, channel: str) -> PubSub:
    """A pub/sub connection for ``channel`` (not yet subscribed). On a cluster it goes to
    the master of the channel's slot: a ``PUBLISH`` reaches every node of a cluster, so
    any node would do, and that one also holds the keys of the same hash tag. redis-py
    picks that node from its slot map without loading it first (a KeyError on a client
    that has not yet sent a command), so the map is loaded here."""
    if not isinstance(client, RedisCluster):
        return client.pubsub()
    await client.initialize()
    try:
        node = client.get_node_from_key(channel)
    except (KeyError, IndexError) as exc:
        raise RedisClusterException(f"no master holds the slot of {channel}") from exc
    return client.pubsub(node=node)


def _safe(url: str) -> str:
    """``url`` without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, after = rest.rpartition("@")  # a raw "@" or "/" in a password too
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}{sep}{user}{':***' if colon else ''}@{after}"


def _scrub(message: str, url: str) -> str:
    """``message``, or a message without any piece of the password of ``url`` if it has
    one (redis-py's own messages quote the parts of a URL it could not read)."""
    userinfo = url.partition("://")[2].rpartition("@")[0]
    secret = userinfo.partition(":")[2]
    pieces = [piece for piece in re.split(r"[/?#@:]", secret) if piece]
    if not any(piece in message for piece in pieces):
        return message
    return (
        f"redis_url {_safe(url)!r} cannot be read; a password with / ? # @ or : in it must "
        f"be percent-encoded (%2F %3F %23 %40 %3A)"
    )
