"""The one warning a scanner pass logs for its refused publishes stays one bounded line."""

from __future__ import annotations

import logging

import pytest

from reliable_msg.errors import BrokerError, Unroutable
from reliable_msg.service.scanners.refusals import warn_failed


def test_the_warning_names_the_first_20_and_counts_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="reliable_msg")
    failed: list[tuple[str, BrokerError]] = [
        (f"m{i} to wms", Unroutable(f"no queue for m{i}")) for i in range(500)
    ]
    warn_failed("redelivery", failed)
    [line] = [r.getMessage() for r in caplog.records]
    assert "500 publishes refused or failed" in line
    assert "(m19 to wms)" in line and "m20 " not in line
    assert line.endswith("and 480 more")
    assert len(line) < 2000


def test_a_short_list_is_named_whole(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="reliable_msg")
    error = Unroutable("no queue")
    warn_failed("check-back", [("a", error), ("b", error)])
    [line] = [r.getMessage() for r in caplog.records]
    assert line == "check-back pass: 2 publishes refused or failed: unroutable: no queue (a, b)"
