"""The demo's own Redis keys (its degradation switch and fallback shards, under the
service's ``fallback.namespace``): removed before a run, so no stale switch or entry of an
earlier run is read by this one."""

from __future__ import annotations

import redis.asyncio as aioredis


async def reset(url: str, namespace: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        for pattern in (f"{{{namespace}}}:*", f"{namespace}:fb:*"):
            keys = [k async for k in client.scan_iter(match=pattern, count=1000)]
            if keys:
                await client.delete(*keys)
    finally:
        await client.aclose()
