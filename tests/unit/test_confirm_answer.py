"""The producer reads a batch confirm's answer by id, never by place."""

from __future__ import annotations

from reliable_msg.errors import Conflict, ServiceUnavailable
from reliable_msg.sdk.client import ItemResult
from reliable_msg.sdk.confirms import each_asked


def ok(id: str) -> ItemResult:
    return ItemResult(id, True, "sent", None, None)


def test_results_come_back_in_the_order_asked() -> None:
    dead = ItemResult("b", False, None, None, Conflict("dead"))
    assert each_asked(["a", "b", "c"], [ok("c"), dead, ok("a")]) == [ok("a"), dead, ok("c")]


def test_an_id_answered_twice_missing_or_failed_without_error_is_not_confirmed() -> None:
    silent = ItemResult("c", False, None, None, None)
    answer = [ok("a"), ok("a"), silent, ok("alien")]
    results = each_asked(["a", "b", "c"], answer)
    assert [r.id for r in results] == ["a", "b", "c"]
    for r in results:
        assert not r.ok and isinstance(r.error, ServiceUnavailable), r
        assert repr(r.id) in r.error.message
