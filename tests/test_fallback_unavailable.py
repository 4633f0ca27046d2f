"""A Redis that does not answer leaves the transports as ``FallbackUnavailable``, chained
from the Redis client's error: the fallback writer and reader, the switch, the ping.
The publisher, degraded with no Redis, refuses the message as an outage (the HTTP answer
stays 503 ``broker_unavailable``) with that error as its cause. Redis is a port nobody
listens on: a real refused connection, nothing patched."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from reliable_msg.errors import BrokerUnavailable, FallbackUnavailable
from reliable_msg.harness.ports import free_port
from reliable_msg.message import Publication
from reliable_msg.transports.publisher import SwitchingPublisher
from reliable_msg.transports.redis import FallbackReader, FallbackWriter, ping
from reliable_msg.transports.switch import Switch


@pytest.fixture
async def nobody() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}", socket_timeout=1.0)
    yield client
    await client.aclose()


def message() -> Publication:
    now = datetime.now(UTC)
    return Publication("m1", "order.paid", "order", "{}", {}, None, now, 1, groups=("wms",))


def calls(redis: aioredis.Redis) -> dict[str, Callable[[], Awaitable[Any]]]:
    writer = FallbackWriter(redis, {"wms": 4}, namespace="t", default_shards=4, alarm=10)
    reader = FallbackReader(redis, namespace="t", group="wms", shards=4, consumer="c")
    switch = Switch(redis, who="test", namespace="t")
    entry = cast(Any, type("E", (), {"stream": "s", "entry_id": "1-0", "fields": {}}))
    return {
        "ping": lambda: ping(redis),
        "write": lambda: writer.write([message()]),
        "record_shards": writer.record_shards,
        "depth": lambda: writer.depth("wms"),
        "dead": lambda: writer.dead("wms"),
        "learn_shards": reader.learn_shards,
        "prepare": reader.prepare,
        "read": lambda: reader.read(reader.keys, 1),
        "reclaim": lambda: reader.reclaim(reader.keys, 1.0, 1),
        "done": lambda: reader.done(entry),
        "bury": lambda: reader.bury(entry, "test"),
        "reader depth": reader.depth,
        "trip": lambda: switch.trip("test"),
        "clear": lambda: switch.clear("test"),
        "refresh": switch.refresh,
        "history": switch.history,
    }


NAMES = [
    "ping",
    *("write", "record_shards", "depth", "dead"),
    *("learn_shards", "prepare", "read", "reclaim", "done", "bury", "reader depth"),
    *("trip", "clear", "refresh", "history"),
]


@pytest.mark.parametrize("name", NAMES)
async def test_a_redis_failure_is_fallback_unavailable_chained(
    nobody: aioredis.Redis, name: str
) -> None:
    call = calls(nobody)
    assert sorted(call) == sorted(NAMES)
    with pytest.raises(FallbackUnavailable) as raised:
        await call[name]()
    assert isinstance(raised.value.__cause__, RedisError | OSError)


class Degraded:
    degraded = True

    def on_change(self, listener: Any) -> None:
        pass


async def test_degraded_with_no_redis_the_refusal_is_an_outage_caused_by_it(
    nobody: aioredis.Redis,
) -> None:
    writer = FallbackWriter(nobody, {}, namespace="t", default_shards=4, alarm=10)
    publisher = SwitchingPublisher(
        cast(Any, None), writer, cast(Any, Degraded()), failure_threshold=3
    )
    refused = await publisher.publish_many([message()])
    error = refused["m1"]
    assert isinstance(error, BrokerUnavailable)
    assert (error.status, error.code) == (503, "broker_unavailable")
    assert isinstance(error.__cause__, FallbackUnavailable)
