"""``reliable-msg purge --older-than``: ages with units."""

from __future__ import annotations

import pytest

from reliable_msg.tools.admin import parse_age


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("90s", 90),
        ("30m", 1800),
        ("12h", 43200),
        ("7d", 604800),
        ("2w", 1209600),
        ("1.5h", 5400),
        (" 7D ", 604800),
        ("0s", 0),
    ],
)
def test_ages(text: str, seconds: float) -> None:
    assert parse_age(text) == seconds


@pytest.mark.parametrize("text", ["", "d", "7x", "-1d", "7 days", "1e3s"])
def test_not_ages(text: str) -> None:
    with pytest.raises(ValueError, match="not an age"):
        parse_age(text)
