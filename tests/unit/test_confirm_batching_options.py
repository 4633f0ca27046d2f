"""The producer's confirm batching options refuse values a batch cannot work with."""

from __future__ import annotations

import pytest

from reliable_msg.sdk.confirms import ConfirmBatching


@pytest.mark.parametrize(
    "options",
    [
        {"window": -0.001},
        {"window": float("nan")},
        # A lone confirm would wait for ever for others to fill its batch.
        {"window": float("inf")},
        {"max_batch": 2.5},
        {"max_running": "4"},
        {"max_batch": 0},
        {"max_running": 0},
    ],
)
def test_bad_options_are_refused_with_their_names(options: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="max_batch >= 1"):
        ConfirmBatching(**options)  # type: ignore[arg-type]


def test_defaults_are_on_with_a_small_window() -> None:
    batching = ConfirmBatching()
    assert batching.enabled and 0 < batching.window <= 0.01
