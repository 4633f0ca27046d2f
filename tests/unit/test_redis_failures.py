"""What the Redis clients raise when Redis, or a Redis Cluster, fails leaves the fallback
as FallbackUnavailable (so degraded-mode handling applies); a misuse does not."""

from __future__ import annotations

import pytest
from redis import exceptions as rex

from reliable_msg.errors import FallbackUnavailable
from reliable_msg.transports.redis import translating


@pytest.mark.parametrize(
    "error",
    [
        rex.ConnectionError("Error 111 connecting to 127.0.0.1:7001"),
        rex.TimeoutError("Timeout reading from socket"),
        rex.ClusterDownError("The cluster is down"),
        rex.MasterDownError("Link with MASTER is down"),
        rex.TryAgainError("TRYAGAIN"),
        rex.MovedError("3999 127.0.0.1:6381"),
        rex.SlotNotCoveredError('Slot "2943" not covered by the cluster'),
        rex.RedisClusterException("Redis Cluster cannot be connected"),
        rex.MaxConnectionsError("Too many connections"),
        ConnectionResetError(),
    ],
)
async def test_a_redis_or_cluster_failure_is_fallback_unavailable(error: Exception) -> None:
    @translating
    async def call() -> None:
        raise error

    with pytest.raises(FallbackUnavailable) as caught:
        await call()
    assert caught.value.__cause__ is error


@pytest.mark.parametrize(
    "error", [rex.CrossSlotTransactionError("cross slot"), rex.InvalidPipelineStack("stack")]
)
async def test_a_cluster_misuse_is_not_taken_for_redis_away(error: Exception) -> None:
    @translating
    async def call() -> None:
        raise error

    with pytest.raises(type(error)):
        await call()
