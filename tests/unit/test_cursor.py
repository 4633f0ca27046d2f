"""The one cursor codec of a message list, shared by the API and the dashboard."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from reliable_msg.errors import BadRequest, Code
from reliable_msg.service import cursor


@pytest.mark.parametrize(
    "position",
    [
        (datetime(2024, 1, 1, tzinfo=UTC), "o-1"),
        (datetime(2024, 1, 1, 12, 30, 0, 123456, tzinfo=UTC), "a.b:c_d-e"),
        (datetime(2024, 1, 1, 14, tzinfo=timezone(timedelta(hours=2))), "x" * 128),
    ],
)
def test_a_cursor_handed_out_comes_back_as_its_position(position: tuple[datetime, str]) -> None:
    text = cursor.encode(position)
    assert text is not None and "=" not in text and "/" not in text and "+" not in text
    assert cursor.decode(text) == position


def test_no_position_is_no_cursor() -> None:
    assert cursor.encode(None) is None
    assert cursor.decode(None) is None
    assert cursor.decode("") is None


@pytest.mark.parametrize("text", ["abc", "!!!", "é", "MjAyNHwxMjM", "WzVd"])
def test_anything_else_is_a_bad_cursor(text: str) -> None:
    with pytest.raises(BadRequest) as raised:
        cursor.decode(text)
    assert raised.value.code is Code.BAD_CURSOR
