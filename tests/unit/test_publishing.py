"""The one publish shape the store is handed, made from a Publisher: answers in order,
one per message, whatever the batching underneath."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime

import pytest

from reliable_msg.errors import BrokerError, BrokerUnavailable, Unroutable
from reliable_msg.message import Publication
from reliable_msg.service.publishing import in_batches, one_by_one


class Recording:
    """A Publisher that refuses the (id, group) pairs in ``refuse`` and records its calls."""

    connected = True

    def __init__(self, refuse: dict[tuple[str, str | None], BrokerError]) -> None:
        self.refuse = refuse
        self.batches: list[list[tuple[str, str | None]]] = []

    async def publish(self, out: Publication) -> None:
        self.batches.append([(out.id, out.group)])
        if (out.id, out.group) in self.refuse:
            raise self.refuse[out.id, out.group]

    async def publish_many(self, outs: list[Publication]) -> dict[str, BrokerError]:
        self.batches.append([(o.id, o.group) for o in outs])
        return {o.id: self.refuse[o.id, o.group] for o in outs if (o.id, o.group) in self.refuse}

    def header_bytes(self, out: Publication) -> int:
        return 0


def out(id: str, group: str | None = None) -> Publication:
    return Publication(id, "order.paid", "order", "{}", {}, None, datetime.now(UTC), 1, group)


async def test_first_publishes_go_in_one_batch_and_are_answered_in_order() -> None:
    refused = Unroutable("no queue")
    publisher = Recording({("b", None): refused})
    answers = await in_batches(publisher)([out("a"), out("b"), out("c")])
    assert answers == [None, refused, None]
    assert publisher.batches == [[("a", None), ("b", None), ("c", None)]]


async def test_one_message_for_two_groups_is_answered_for_each() -> None:
    down = BrokerUnavailable("away")
    publisher = Recording({("a", "wms"): down})
    outs = [out("a", "wms"), out("a", "billing"), out("b", "wms")]
    assert await in_batches(publisher)(outs) == [down, None, None]
    assert sorted(map(sorted, publisher.batches)) == [
        [("a", "billing")],
        [("a", "wms"), ("b", "wms")],
    ]


async def test_one_by_one_publishes_each_alone() -> None:
    refused = Unroutable("no queue")
    publisher = Recording({("a", "wms"): refused})
    outs = [out("a", "wms"), out("a", "billing")]
    assert await one_by_one(publisher)(outs) == [refused, None]
    assert len(publisher.batches) == 2


async def test_one_by_one_raises_what_is_not_a_broker_error() -> None:
    class Broken(Recording):
        async def publish(self, out: Publication) -> None:
            raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):
        await one_by_one(Broken({}))([out("a", "wms")])


def test_the_use_cases_and_scanners_never_import_the_store() -> None:
    code = (
        "import sys, reliable_msg.service.usecases, reliable_msg.service.scanners, "
        "reliable_msg.service.monitor; "
        "print([m for m in sys.modules if m.startswith(('reliable_msg.service.store', 'asyncpg'))])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
