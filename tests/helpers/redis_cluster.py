"""The Redis Cluster the tests start (three masters of their own on loopback ports, see
:mod:`reliable_msg.harness.redis_cluster`): once per test session, when a test first asks
for it, and destroyed at the session's end whatever the tests did.

``redis_url`` is the Redis of a test's settings (``make_settings``): the machine's Redis,
unless the test is parametrized with :data:`ON_REDIS_AND_CLUSTER` (or ``redis_url``
indirectly with :data:`CLUSTER`), which runs the same test body on the cluster too.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from redis import Redis as SyncRedis
from redis.cluster import ClusterNode as SyncClusterNode
from redis.cluster import RedisCluster as SyncRedisCluster

from reliable_msg.harness.redis_cluster import RedisCluster
from reliable_msg.service.settings import Settings
from reliable_msg.transports.redis_client import is_cluster_url, parse_cluster_url

#: The parameters of ``redis_url``: the machine's Redis, the tests' Redis Cluster.
PLAIN = "redis"
CLUSTER = "cluster"
#: A test's body run once on the machine's Redis and once on the Redis Cluster.
ON_REDIS_AND_CLUSTER = pytest.mark.parametrize("redis_url", [PLAIN, CLUSTER], indirect=True)
#: The machine's Redis, as the service's default settings name it.
PLAIN_URL: str = Settings.model_fields["redis_url"].default


@pytest.fixture(scope="session")
def redis_cluster_session() -> Iterator[RedisCluster]:
    cluster = RedisCluster(masters=3)
    cluster.start()
    try:
        yield cluster
    finally:
        # destroy() raises if a node still runs or listens: no redis-server left behind.
        cluster.destroy()


@pytest.fixture
def redis_cluster(redis_cluster_session: RedisCluster) -> RedisCluster:
    """The session's Redis Cluster with every node running and the cluster ``ok``
    (a master an earlier test killed is started again, empty)."""
    redis_cluster_session.heal()
    return redis_cluster_session


@pytest.fixture
def redis_url(request: pytest.FixtureRequest) -> str:
    """The ``redis_url`` of the test's settings: :data:`PLAIN` (the default) or
    :data:`CLUSTER`, by indirect parametrization."""
    kind = getattr(request, "param", PLAIN)
    if kind == CLUSTER:
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        return cluster.url
    assert kind == PLAIN, f"redis_url is {PLAIN!r} or {CLUSTER!r}, not {kind!r}"
    return PLAIN_URL


def sync_redis(url: str) -> SyncRedis | SyncRedisCluster:
    """A blocking client of the Redis or Redis Cluster ``url`` names, for code that
    cannot await (the service and the SDKs use :func:`redis_client`)."""
    if not is_cluster_url(url):
        return SyncRedis.from_url(url)
    parsed = parse_cluster_url(url)
    nodes = [SyncClusterNode(host, port) for host, port in parsed.nodes]  # type: ignore[no-untyped-call]
    return SyncRedisCluster(startup_nodes=nodes, **parsed.options)
