"""Where the moves a message's rows record go among its history rows, where concurrent
transactions leave times out of the order their row locks put the moves in (``now()``
is a transaction's start). The paths themselves run for real in
tests/test_history_paths.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from reliable_msg.message import Delivery, Message, Transition
from reliable_msg.service.store.history import merged
from reliable_msg.states import DeliveryStatus, MessageStatus

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(ms: int) -> datetime:
    return T0 + timedelta(milliseconds=ms)


def delivery(group: str, done: int | None) -> Delivery:
    status = DeliveryStatus.SENT if done is None else DeliveryStatus.DONE
    return Delivery(group, status, 1, None, None, T0, None if done is None else at(done))


def message(
    status: MessageStatus, *deliveries: Delivery, sent: int | None = 1, finished: int | None = None
) -> Message:
    return Message(
        id="m",
        topic="t",
        producer="p",
        payload="{}",
        headers={},
        key=None,
        status=status,
        groups=tuple(d.group for d in deliveries),
        check_attempts=0,
        next_check_at=None,
        last_error=None,
        created_at=T0,
        updated_at=T0,
        sent_at=None if sent is None else at(sent),
        finished_at=None if finished is None else at(finished),
        deliveries=deliveries,
    )


def row(group: str | None, src: str | None, dst: str, ms: int, why: str) -> Transition:
    return Transition(group, src, dst, at(ms), why)


def moves(history: list[Transition]) -> list[tuple[str | None, str | None, str, str | None]]:
    return [(t.group_name, t.from_status, t.to_status, t.reason) for t in history]


PREPARE = (None, None, "pending", "prepare")
CONFIRM = (None, "pending", "sent", "confirm")
FINISH = (None, "sent", "done", "last delivery acked")


def test_a_pending_message_is_its_prepare() -> None:
    assert merged([], message(MessageStatus.PENDING, sent=None)) == [
        Transition(None, None, "pending", T0, "prepare")
    ]


def test_the_ack_that_finished_goes_last_though_its_transaction_began_first() -> None:
    """a's ack began at 5 but waited for b's (begun at 6) on the message's lock."""
    m = message(MessageStatus.DONE, delivery("a", 5), delivery("b", 6), finished=5)
    assert moves(merged([], m)) == [
        PREPARE,
        CONFIRM,
        ("b", "sent", "done", "ack"),
        ("a", "sent", "done", "ack"),
        FINISH,
    ]


def test_an_ack_follows_every_move_of_its_group_whatever_their_times() -> None:
    """The ack began at 5, the redelivery at 6 and claimed the delivery first."""
    redelivered = row("a", "sent", "sent", 6, "redelivered, attempt 2")
    m = message(MessageStatus.SENT, delivery("a", 5), delivery("b", None))
    assert moves(merged([redelivered], m)) == [
        PREPARE,
        CONFIRM,
        ("a", "sent", "sent", "redelivered, attempt 2"),
        ("a", "sent", "done", "ack"),
    ]


def test_the_confirm_follows_every_move_in_and_out_of_pending() -> None:
    """The confirm began at 3, before the requeue (at 4) it waited for."""
    rows = [
        row(None, "pending", "dead", 2, "check-back exhausted: no answer"),
        row(None, "dead", "pending", 4, "requeue: check-back starts again"),
    ]
    m = message(MessageStatus.SENT, delivery("a", None), sent=3)
    assert moves(merged(rows, m)) == [PREPARE, *moves(rows), CONFIRM]


def test_acks_go_between_other_groups_moves_by_time() -> None:
    rows = [
        row("b", "sent", "dead", 4, "not acked"),
        row(None, "sent", "dead", 4, "not acked"),
        row("b", "dead", "sent", 8, "requeue"),
        row(None, "dead", "sent", 8, "requeue"),
    ]
    m = message(
        MessageStatus.DONE, delivery("a", 6), delivery("b", 9), delivery("c", 2), finished=9
    )
    assert moves(merged(rows, m)) == [
        PREPARE,
        CONFIRM,
        ("c", "sent", "done", "ack"),
        *moves(rows[:2]),
        ("a", "sent", "done", "ack"),
        *moves(rows[2:]),
        ("b", "sent", "done", "ack"),
        FINISH,
    ]


def test_a_check_back_confirm_keeps_its_row_and_reason() -> None:
    rows = [row(None, "pending", "sent", 1, "check-back: committed")]
    m = message(MessageStatus.SENT, delivery("a", None))
    assert moves(merged(rows, m)) == [PREPARE, (None, "pending", "sent", "check-back: committed")]


def test_rows_an_older_version_wrote_are_not_derived_again() -> None:
    rows = [
        row(None, None, "pending", 0, "prepare"),
        row(None, "pending", "sent", 1, "confirm"),
        row("a", "sent", "done", 2, "ack"),
    ]
    m = message(MessageStatus.DONE, delivery("a", 2), delivery("b", 3), finished=3)
    assert moves(merged(rows, m)) == [
        PREPARE,
        CONFIRM,
        ("a", "sent", "done", "ack"),
        ("b", "sent", "done", "ack"),
        FINISH,
    ]
    whole = [*rows, row("b", "sent", "done", 3, "ack"), row(None, "sent", "done", 3, FINISH[3])]
    assert merged(whole, m) == whole
