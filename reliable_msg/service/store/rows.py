"""Rows to the core's values, and the SQL the store's parts share."""

from __future__ import annotations

import json

import asyncpg

from reliable_msg.message import Delivery, Message, Publication
from reliable_msg.states import D, DeliveryStatus, MessageStatus

#: The columns :func:`as_message` reads.
MESSAGE_COLUMNS = """
    id, topic, producer, payload::text AS payload, headers::text AS headers, key, status,
    groups, check_attempts, next_check_at, last_error, created_at, updated_at, sent_at,
    finished_at, refusals
"""

#: Head of the statement that records moves in the history, in the same statement as
#: the move itself (as a CTE), so the history never disagrees with the state. The moves
#: the rows' own times record (prepare, the producer's confirm, acks and the finish)
#: write none: see :mod:`~reliable_msg.service.store.history`.
TRANSITION = """
    INSERT INTO rmsg_transition (message_id, group_name, from_status, to_status, reason)
"""


def as_message(row: asyncpg.Record, deliveries: tuple[Delivery, ...] = ()) -> Message:
    return Message(
        id=row["id"],
        topic=row["topic"],
        producer=row["producer"],
        payload=row["payload"],
        headers=json.loads(row["headers"]),
        key=row["key"],
        status=MessageStatus(row["status"]),
        groups=tuple(row["groups"]),
        check_attempts=row["check_attempts"],
        next_check_at=row["next_check_at"],
        last_error=row["last_error"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        sent_at=row["sent_at"],
        finished_at=row["finished_at"],
        refusals=row["refusals"],
        deliveries=deliveries,
    )


def as_delivery(row: asyncpg.Record) -> Delivery:
    return Delivery(
        group=row["group_name"],
        status=DeliveryStatus(row["status"]),
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"] if row["status"] == D.SENT.value else None,
        last_error=row["last_error"],
        updated_at=row["updated_at"],
        done_at=row["done_at"],
    )


def as_due(row: asyncpg.Record) -> Publication:
    """A delivery due again, as its next publish to its group."""
    return Publication(
        id=row["message_id"],
        topic=row["topic"],
        producer=row["producer"],
        payload=row["payload"],
        headers=json.loads(row["headers"]),
        key=row["key"],
        created_at=row["created_at"],
        attempt=row["attempts"] + 1,
        group=row["group_name"],
        refusals=row["refusals"],
    )
