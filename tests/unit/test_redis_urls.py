"""``redis_url``: one Redis, or a Redis Cluster by its seed nodes; anything else is
refused at start-up with the reason."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from reliable_msg.sdk.consumer.fallback import FallbackDrain
from reliable_msg.service.settings import Settings
from reliable_msg.transports.redis_client import (
    check_redis_url,
    parse_cluster_url,
    redis_client,
)


def test_a_cluster_url_names_its_seed_nodes() -> None:
    parsed = parse_cluster_url("redis+cluster://10.0.0.1:7000,10.0.0.2:7001,redis-3:7002")
    assert parsed.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7001), ("redis-3", 7002))
    assert parsed.options == {}


def test_credentials_tls_and_options_reach_every_node() -> None:
    parsed = parse_cluster_url(
        "rediss+cluster://app:s%40cret@a:7000,[::1]:7001/0"
        "?socket_timeout=1.5&ssl_cert_reqs=none&client_name=rmsg"
    )
    assert parsed.nodes == (("a", 7000), ("::1", 7001))
    assert parsed.options == {
        "username": "app",
        "password": "s@cret",
        "ssl": True,
        "socket_timeout": 1.5,
        "ssl_cert_reqs": "none",
        "client_name": "rmsg",
    }


def test_a_node_without_a_port_is_on_6379() -> None:
    assert parse_cluster_url("redis+cluster://a,b:7000/").nodes == (("a", 6379), ("b", 7000))


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis+cluster://a:7000,b:7001/1", "database 0 only"),
        ("redis+cluster://a:7000?db=2", "database 0 only"),
        ("redis+cluster://a:7000,,b:7001", "without a host"),
        ("redis+cluster://", "without a host"),
        ("redis+cluster://a:70x0", "bad port"),
        ("redis+cluster://a:70000", "bad port"),
        ("redis+cluster://a:7000,a:7000", "named twice"),
        ("redis+cluster://[::1:7000", "bad node"),
        ("http://a:7000", "redis_url must be"),
        ("a:7000", "redis_url must be"),
        ("redis://a:6379/0?socket_timeout=soon", "socket_timeout"),
    ],
)
def test_a_bad_url_is_refused_with_the_reason(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        check_redis_url(url)


def test_the_password_stays_out_of_the_message() -> None:
    with pytest.raises(ValueError) as caught:
        check_redis_url("redis+cluster://app:hunter2@a:7000/3")
    assert "hunter2" not in str(caught.value)
    assert "app:***@a:7000" in str(caught.value)


def test_the_factory_builds_the_client_the_url_names() -> None:
    plain = redis_client("redis://127.0.0.1:6379/2", socket_timeout=2.0)
    assert type(plain) is aioredis.Redis
    assert plain.connection_pool.connection_kwargs["db"] == 2
    cluster = redis_client("redis+cluster://u:p@127.0.0.1:7000,127.0.0.1:7001", socket_timeout=2.0)
    assert isinstance(cluster, RedisCluster)
    assert [n.name for n in cluster.nodes_manager.startup_nodes.values()] == [
        "127.0.0.1:7000",
        "127.0.0.1:7001",
    ]
    node = next(iter(cluster.nodes_manager.startup_nodes.values()))
    assert node.connection_kwargs["password"] == "p"
    assert node.connection_kwargs["socket_timeout"] == 2.0


def test_an_unknown_cluster_option_is_refused() -> None:
    with pytest.raises(ValueError, match="bad option"):
        redis_client("redis+cluster://a:7000?no_such_option=1")


def test_settings_refuse_a_bad_redis_url_at_start_up() -> None:
    assert Settings(redis_url="redis+cluster://a:7000,b:7001").redis_url.startswith("redis+")
    with pytest.raises(ValueError, match="database 0 only"):
        Settings(redis_url="redis+cluster://a:7000/5")


def test_the_consumer_refuses_a_bad_redis_url() -> None:
    with pytest.raises(ValueError, match="redis_url must be"):
        FallbackDrain(
            None,  # type: ignore[arg-type]  # refused before the consumer is looked at
            "mongodb://a:7000",
            namespace="rmsg",
            shards=4,
            workers=1,
            poll_interval=1.0,
            claim_idle=30.0,
            dead_maxlen=100,
        )
