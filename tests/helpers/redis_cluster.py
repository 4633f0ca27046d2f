"""The Redis Cluster the tests start (three masters of their own on loopback ports, see
:mod:`reliable_msg.harness.redis_cluster`): once per test session, when a test first asks
for it, and destroyed at the session's end whatever the tests did."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from reliable_msg.harness.redis_cluster import RedisCluster


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
