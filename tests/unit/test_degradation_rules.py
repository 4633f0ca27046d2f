"""The degradation rules without I/O: when the publisher trips the switch, and the Redis
key names (Cluster hash tags)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, cast

from redis.crc import key_slot

from reliable_msg import constants
from reliable_msg.errors import BrokerError, BrokerUnavailable, Unpublishable, Unroutable
from reliable_msg.message import Publication
from reliable_msg.service.settings import FallbackSettings
from reliable_msg.transports.publisher import SwitchingPublisher
from reliable_msg.transports.redis import shard_keys


class RefusingRabbitMQ:
    """A RabbitMQ that refuses every publish with ``error`` (or takes them, when None)."""

    publish_timeout = 1.0
    connected = False

    def __init__(self) -> None:
        self.error: BrokerError | None = BrokerUnavailable("no publisher confirm within 1.0s")

    async def publish_many(self, outs: list[Publication]) -> dict[str, BrokerError]:
        return {} if self.error is None else {o.id: self.error for o in outs}


class SwitchFlag:
    def __init__(self) -> None:
        self.degraded = False
        self.reasons: list[str] = []

    def on_change(self, listener: Any) -> None:
        pass

    async def trip(self, reason: str) -> bool:
        self.reasons.append(reason)
        flipped = not self.degraded
        self.degraded = True
        return flipped


class Fallback:
    def __init__(self) -> None:
        self.written: list[str] = []

    async def write(self, outs: list[Publication]) -> None:
        self.written += [o.id for o in outs]


def message(id: str) -> Publication:
    return Publication(id, "order.paid", "order", "{}", {}, None, datetime.now(UTC), 1)


def publisher(threshold: int) -> tuple[SwitchingPublisher, RefusingRabbitMQ, SwitchFlag, Fallback]:
    rabbit, switch, fallback = RefusingRabbitMQ(), SwitchFlag(), Fallback()
    sp = SwitchingPublisher(
        cast(Any, rabbit), cast(Any, fallback), cast(Any, switch), failure_threshold=threshold
    )
    return sp, rabbit, switch, fallback


def test_the_default_threshold_is_ten_consecutive_failures() -> None:
    assert FallbackSettings().failure_threshold == 10


async def test_threshold_minus_one_failures_leave_the_switch_off_and_the_nth_trips_it() -> None:
    threshold = FallbackSettings().failure_threshold
    sp, _, switch, fallback = publisher(threshold)
    for i in range(threshold - 1):
        refused = await sp.publish_many([message(f"m{i}")])
        assert list(refused) == [f"m{i}"]
    assert not switch.degraded and sp.failures == threshold - 1

    # The N-th failure trips the switch, and that message goes to the fallback at once.
    assert await sp.publish_many([message("nth")]) == {}
    assert switch.degraded
    assert fallback.written == ["nth"]
    assert "no publisher confirm" in switch.reasons[0]


async def test_a_publish_taken_in_between_starts_the_count_again() -> None:
    sp, rabbit, switch, _ = publisher(3)
    for id in ("a", "b"):
        await sp.publish_many([message(id)])
    rabbit.error = None
    assert await sp.publish_many([message("taken")]) == {}
    rabbit.error = BrokerUnavailable("connection reset")
    for id in ("c", "d"):
        await sp.publish_many([message(id)])
    assert not switch.degraded and sp.failures == 2


async def test_a_batch_taken_in_part_starts_the_count_again() -> None:
    sp, rabbit, switch, _ = publisher(3)
    for id in ("a", "b"):
        await sp.publish_many([message(id)])
    error = BrokerUnavailable("no publisher confirm within 1.0s")

    async def refuse_one(outs: list[Publication]) -> dict[str, BrokerError]:
        return {outs[0].id: error}

    rabbit.publish_many = refuse_one  # type: ignore[method-assign]
    refused = await sp.publish_many([message("refused"), message("taken")])
    assert list(refused) == ["refused"]
    assert not switch.degraded and sp.failures == 1


async def test_unroutable_messages_never_trip_the_switch() -> None:
    sp, rabbit, switch, _ = publisher(2)
    rabbit.error = Unroutable("no queue is bound for 'x'")
    for i in range(5):
        await sp.publish_many([message(f"u{i}")])
    assert not switch.degraded and sp.failures == 0


async def test_the_trip_sends_only_the_outage_failures_to_the_fallback() -> None:
    """A refusal (unroutable, unpublishable) in the batch that trips the switch keeps its
    own error: Redis would take it, and it would skip the refusal count that ends it."""
    sp, rabbit, switch, fallback = publisher(1)
    outage = BrokerUnavailable("no publisher confirm within 1.0s")
    refusals: dict[str, BrokerError] = {
        "unroutable": Unroutable("no queue is bound for 'x'"),
        "unpublishable": Unpublishable("its header is 200,111 bytes"),
    }

    async def mixed(outs: list[Publication]) -> dict[str, BrokerError]:
        return {o.id: refusals.get(o.id, outage) for o in outs}

    rabbit.publish_many = mixed  # type: ignore[method-assign]
    refused = await sp.publish_many([message(id) for id in ("down", *refusals)])
    assert switch.degraded and fallback.written == ["down"]
    assert refused == refusals


def tag(key: str) -> str:
    found = re.fullmatch(r"[^{]*\{([^}]*)\}.*", key)
    assert found is not None, key
    return found[1]


def test_the_switch_keys_share_one_cluster_slot() -> None:
    keys = [
        k.format(ns="rmsg")
        for k in (constants.SWITCH_KEY, constants.SWITCH_HISTORY_KEY, constants.SWITCH_CHANNEL)
    ]
    assert {tag(k) for k in keys} == {"rmsg"}
    # The flip script takes the hash and the history: one slot, as a Cluster requires.
    assert len({key_slot(k.encode()) for k in keys}) == 1


def test_each_shard_has_a_hash_tag_of_its_own() -> None:
    keys = shard_keys("rmsg", "inventory", 128) + shard_keys("rmsg", "wms", 128)
    tags = [tag(k) for k in keys]
    assert tags[:2] == ["inventory:0", "inventory:1"]
    assert len(set(tags)) == len(keys)
    # The slot is the tag's, and the shards spread over the cluster's slots.
    assert all(
        key_slot(k.encode()) == key_slot(t.encode()) for k, t in zip(keys, tags, strict=True)
    )
    assert len({key_slot(k.encode()) for k in keys}) > 200
