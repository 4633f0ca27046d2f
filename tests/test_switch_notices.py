"""A message on the switch's channel that is not a notice of the switch (anyone may
publish there) is logged and the switch read instead; the watcher goes on."""

from __future__ import annotations

import asyncio
import uuid

import redis.asyncio as aioredis

from reliable_msg import constants
from reliable_msg.transports.redis import delete_namespace
from reliable_msg.transports.switch import Switch
from tests.helpers.waiting import wait_until

REDIS_URL = "redis://127.0.0.1:6379/0"


async def test_a_stray_message_on_the_channel_does_not_end_the_watcher() -> None:
    ns = f"rmsg-test-{uuid.uuid4().hex[:8]}"
    client = aioredis.Redis.from_url(REDIS_URL)
    flipper = Switch(client, who="flipper", namespace=ns)
    watcher = Switch(client, who="watcher", namespace=ns, poll_interval=60.0)
    watching = asyncio.create_task(watcher.watch())
    try:
        await asyncio.sleep(0.3)  # subscribed
        channel = constants.SWITCH_CHANNEL.format(ns=ns)
        for stray in (b"not json", b"[1, 2]", b"\xff\xfe", b'{"mode": "degraded", "at": "x"}'):
            await client.publish(channel, stray)
        await asyncio.sleep(0.3)
        assert not watching.done(), "the watcher died of a stray message"
        assert not watcher.degraded
        assert await flipper.trip("test")
        await wait_until(lambda: watcher.degraded, within=5)  # a notice, not a re-read
    finally:
        watcher.stop()
        await asyncio.wait_for(watching, 5)
        await client.aclose()
        await delete_namespace(REDIS_URL, ns)
