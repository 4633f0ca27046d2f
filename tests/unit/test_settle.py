"""The consumer's one settle decision (``Settler.settle``): what becomes of a message
from either source, for each thing its handling can come to. A recording source stands
in for RabbitMQ and Redis; the real sources are in test_poison, test_no_handler,
test_drain_faults and test_sdk."""

from __future__ import annotations

import asyncio
import logging

import pytest

from reliable_msg.errors import ReliableMsgError
from reliable_msg.sdk.client import ServiceClient
from reliable_msg.sdk.consumer import AckBatcher, Outcome, Poison, Received, Verdict
from reliable_msg.sdk.consumer.settle import Settler

MESSAGE = Received(id="m-1", topic="order.paid", payload={})


class Recording:
    """A source that records what it was asked to do; ``fails`` makes each call raise."""

    where = "a recording source"

    def __init__(self, *, fails: bool = False) -> None:
        self.calls: list[str] = []
        self._fails = fails

    async def _do(self, call: str) -> None:
        self.calls.append(call)
        if self._fails:
            raise ConnectionError("the source went away")

    async def ack(self) -> None:
        await self._do("ack")

    async def retry(self) -> None:
        await self._do("retry")

    async def reject(self, reason: str) -> None:
        await self._do(f"reject: {reason}")


def batcher() -> AckBatcher:
    return AckBatcher(ServiceClient("http://127.0.0.1:9", "-"), size=100, interval=60.0)


@pytest.mark.parametrize(
    ("message", "outcome", "verdict", "calls"),
    [
        (MESSAGE, True, Verdict.ACK, []),
        (MESSAGE, False, Verdict.ACK, []),
        (Poison("no message_id"), Poison("no message_id"), Verdict.DEAD, ["reject: no message_id"]),
        (
            MESSAGE,
            Poison("no handler for topic 'order.paid'", id="m-1"),
            Verdict.DEAD,
            ["reject: no handler for topic 'order.paid'"],
        ),
        (MESSAGE, RuntimeError("handler failed"), Verdict.RETRY, ["retry"]),
        (MESSAGE, asyncio.CancelledError(), Verdict.LEAVE, []),
    ],
    ids=["handled", "duplicate", "unreadable", "no handler", "handler failed", "stopping"],
)
async def test_each_outcome_has_one_verdict(
    message: Received | Poison, outcome: Outcome, verdict: Verdict, calls: list[str]
) -> None:
    acks, source = batcher(), Recording()
    assert await Settler("inventory", acks).settle(message, outcome, source) is verdict
    assert source.calls == calls
    assert acks._pending == ([(MESSAGE.id, source)] if verdict is Verdict.ACK else [])


async def test_a_source_that_went_away_is_left_to_deliver_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = Recording(fails=True)
    settler = Settler("inventory", batcher())
    assert await settler.settle(MESSAGE, RuntimeError("x"), source) is Verdict.RETRY
    assert await settler.settle(MESSAGE, Poison("bad", id="m-1"), source) is Verdict.DEAD
    assert source.calls == ["retry", "reject: bad"]
    lost = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in lost] == [
        "consumer inventory: release of m-1 at its source lost (the source went away)",
        "consumer inventory: rejection of m-1 at its source lost (the source went away)",
    ]


def test_poison_is_in_the_one_tree_and_still_a_value_error() -> None:
    poison = Poison("body is not JSON", id="m-1")
    assert isinstance(poison, ReliableMsgError) and isinstance(poison, ValueError)
    assert (str(poison), poison.id) == ("body is not JSON", "m-1")


async def test_a_rejection_the_source_lost_is_not_logged_as_done(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The log says "rejected" only once the source took the rejection; a lost one is a
    warning, and the message comes back from its source."""
    poison = Poison("no handler for topic 'order.paid'", id="m-1")
    caplog.set_level(logging.INFO, logger="reliable_msg.sdk.consumer")
    settler = Settler("inventory", batcher())
    assert await settler.settle(MESSAGE, poison, Recording(fails=True)) is Verdict.DEAD
    assert not [r for r in caplog.records if "rejected message" in r.getMessage()]
    assert [r for r in caplog.records if "rejection of m-1" in r.getMessage()]
    caplog.clear()
    assert await settler.settle(MESSAGE, poison, Recording()) is Verdict.DEAD
    assert [r for r in caplog.records if "rejected message m-1" in r.getMessage()]
