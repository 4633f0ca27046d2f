"""The one publish the store is handed (:data:`~reliable_msg.service.ports.Publish`),
made from the :class:`~reliable_msg.service.ports.Publisher` port in the two ways the
use-cases publish."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from reliable_msg.errors import BrokerError
from reliable_msg.message import Publication
from reliable_msg.service.ports import Publish, Publisher


def in_batches(publisher: Publisher) -> Publish:
    """Publish with one :meth:`~Publisher.publish_many` per target (the topic for first
    publishes, else each group): the publisher answers by message id, and a batch may
    hold one message for several groups (a requeue)."""

    async def publish(outs: Sequence[Publication]) -> list[BrokerError | None]:
        by_group: dict[str | None, list[Publication]] = {}
        for out in outs:
            by_group.setdefault(out.group, []).append(out)
        if len(by_group) == 1:  # a confirm: no task for the one batch
            [(group, batch)] = by_group.items()
            refused = {group: await publisher.publish_many(batch)}
        else:
            answers = await asyncio.gather(*(publisher.publish_many(b) for b in by_group.values()))
            refused = dict(zip(by_group, answers, strict=True))
        return [refused[out.group].get(out.id) for out in outs]

    return publish


def one_by_one(publisher: Publisher) -> Publish:
    """Publish each message on its own, all at once (redelivery: each publish counts
    on its own towards the degradation switch)."""

    async def publish(outs: Sequence[Publication]) -> list[BrokerError | None]:
        results = await asyncio.gather(
            *(publisher.publish(o) for o in outs), return_exceptions=True
        )
        answers: list[BrokerError | None] = []
        for result in results:
            if isinstance(result, BrokerError):
                answers.append(result)
            elif isinstance(result, BaseException):
                raise result
            else:
                answers.append(None)
        return answers

    return publish
