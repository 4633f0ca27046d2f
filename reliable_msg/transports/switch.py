"""The degradation switch: shared by every service instance and every consumer.

The switch is a Redis hash (mode, who flipped it, when, why). A flip is one Lua script:
it changes the hash only if the mode differs, appends to the history and publishes a
notice, so racing instances flip it once and record it once. Every holder also re-reads
the hash every ``poll_interval`` seconds, so a missed notice costs at most that long.
A Redis failure leaves this module as :class:`FallbackUnavailable`, chained.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from reliable_msg import constants
from reliable_msg.errors import FallbackUnavailable
from reliable_msg.metrics import MODE, MODE_CHANGES
from reliable_msg.transports.redis import translating
from reliable_msg.transports.redis_client import RedisClient, pubsub

log = logging.getLogger(__name__)


#: Longest a watcher takes to notice stop().
STOP_LATENCY = 0.1


class Mode(StrEnum):
    #: Messages go through RabbitMQ.
    NORMAL = "normal"
    #: RabbitMQ is down: messages go through the Redis fallback shards.
    DEGRADED = "degraded"


@dataclass(frozen=True, slots=True)
class SwitchState:
    mode: Mode
    by: str | None = None
    at: float | None = None
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode.value, "by": self.by, "at": self.at, "reason": self.reason}


#: KEYS: switch hash, history list. ARGV: mode, by, at, reason, history length.
#: Returns 1 when this call changed the mode, 0 when it was already so.
_FLIP = """
local current = redis.call('HGET', KEYS[1], 'mode') or 'normal'
if current == ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'mode', ARGV[1], 'by', ARGV[2], 'at', ARGV[3], 'reason', ARGV[4])
local notice = cjson.encode({mode=ARGV[1], by=ARGV[2], at=tonumber(ARGV[3]), reason=ARGV[4]})
redis.call('LPUSH', KEYS[2], notice)
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[5]) - 1)
redis.call('PUBLISH', ARGV[6], notice)
return 1
"""


class Switch:
    """One holder's view of the shared switch, kept fresh by :meth:`watch`."""

    def __init__(
        self,
        redis: RedisClient,
        *,
        who: str,
        namespace: str = constants.REDIS_NAMESPACE,
        poll_interval: float = 1.0,
    ) -> None:
        self._redis = redis
        self._key = constants.SWITCH_KEY.format(ns=namespace)
        self._history = constants.SWITCH_HISTORY_KEY.format(ns=namespace)
        self._channel = constants.SWITCH_CHANNEL.format(ns=namespace)
        self._who = who
        self._poll = poll_interval
        self._state = SwitchState(Mode.NORMAL)
        self._flip = redis.register_script(_FLIP)
        self._changed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._listeners: list[Callable[[SwitchState], None]] = []

    def on_change(self, listener: Callable[[SwitchState], None]) -> None:
        """Call ``listener`` with the new state at every change of mode this holder sees:
        its own flips, and others' seen in a notice or a re-read."""
        self._listeners.append(listener)

    @property
    def state(self) -> SwitchState:
        return self._state

    @property
    def degraded(self) -> bool:
        return self._state.mode is Mode.DEGRADED

    async def trip(self, reason: str) -> bool:
        """Turn degradation on; True if this call flipped it."""
        return await self._set(Mode.DEGRADED, reason)

    async def clear(self, reason: str) -> bool:
        """Turn degradation off; True if this call flipped it."""
        return await self._set(Mode.NORMAL, reason)

    @translating
    async def _set(self, mode: Mode, reason: str) -> bool:
        now = time.time()
        flipped = bool(
            await self._flip(
                keys=[self._key, self._history],
                args=[
                    mode.value,
                    self._who,
                    repr(now),
                    reason,
                    constants.SWITCH_HISTORY_LENGTH,
                    self._channel,
                ],
            )
        )
        if flipped:
            MODE_CHANGES.labels(mode.value).inc()
            log.warning("switch set to %s by %s: %s", mode.value, self._who, reason)
        self._apply(SwitchState(mode, self._who, now, reason) if flipped else None)
        if not flipped:
            await self.refresh()
        return flipped

    @translating
    async def refresh(self) -> SwitchState:
        """Re-read the switch from Redis."""
        raw = await self._redis.hgetall(self._key)
        self._apply(_state(raw))
        return self._state

    def _apply(self, state: SwitchState | None) -> None:
        if state is None:
            return
        changed = state.mode is not self._state.mode
        self._state = state
        if changed:
            log.info("%s sees the switch %s", self._who, state.mode.value)
            self._changed.set()
            for listener in self._listeners:
                try:
                    listener(state)
                except Exception:  # a listener's bug must not pass for a Redis failure
                    log.exception("a listener of the switch failed on %s", state.mode.value)
        MODE.set(1 if state.mode is Mode.DEGRADED else 0)

    async def changed(self) -> None:
        """Wait until this holder sees the mode change."""
        await self._changed.wait()
        self._changed.clear()

    @translating
    async def history(self, limit: int = 20) -> list[dict[str, Any]]:
        items = await self._redis.lrange(self._history, 0, limit - 1)
        return [json.loads(item) for item in items]

    async def watch(self) -> None:
        """Follow the switch until :meth:`stop`: pub/sub notices plus periodic re-reads.

        Survives Redis going away and coming back; while Redis is unreachable the last
        known state holds. Stopping is a flag checked at least every ``poll_interval``,
        not a task cancellation, which a read inside the Redis client could swallow.
        """
        while not self._stopping.is_set():
            try:
                await self._follow()
            except FallbackUnavailable as exc:
                log.debug("switch watch: Redis unavailable (%s)", exc)
                await self._pause(self._poll)

    def stop(self) -> None:
        """End :meth:`watch` within one poll interval."""
        self._stopping.set()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    @translating
    async def _follow(self) -> None:
        notices = await pubsub(self._redis, self._channel)
        try:
            await notices.subscribe(self._channel)
            await self.refresh()
            next_poll = time.monotonic() + self._poll
            while not self._stopping.is_set():
                # Short waits, so that stop() takes effect quickly; they cost no traffic.
                timeout = min(STOP_LATENCY, max(0.0, next_poll - time.monotonic()))
                message = await notices.get_message(ignore_subscribe_messages=True, timeout=timeout)
                if message is not None:
                    self._apply(_state(json.loads(message["data"])))
                if time.monotonic() >= next_poll:
                    await self.refresh()
                    next_poll = time.monotonic() + self._poll
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await notices.aclose()  # type: ignore[no-untyped-call]


def _state(raw: dict[Any, Any]) -> SwitchState:
    data = {_text(k): v for k, v in raw.items()}
    mode = _text(data.get("mode", "normal"))
    at = data.get("at")
    return SwitchState(
        mode=Mode(mode) if mode in Mode._value2member_map_ else Mode.NORMAL,
        by=_text(data["by"]) if data.get("by") is not None else None,
        at=float(_text(at)) if at is not None else None,
        reason=_text(data["reason"]) if data.get("reason") is not None else None,
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
