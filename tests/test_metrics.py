"""``/metrics`` of a real service process moves with the traffic it serves, and its JSON
log (``RMSG_LOG_FORMAT=json``) names the message of every line about a message."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from reliable_msg.service.settings import Settings
from tests.conftest import GROUP_TOKENS, PRODUCER, auth
from tests.helpers.service import Instance, remove_traces, running, write_config
from tests.helpers.waiting import wait_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

#: Messages acked by every group.
DONE = [f"mt-done-{i}" for i in range(8)]
#: Confirmed, never acked: redelivered once, then dead.
UNACKED = "mt-unacked"
#: Prepared, never confirmed: check-back fails (nobody listens) until it is dead.
UNCONFIRMED = "mt-unconfirmed"
CANCELLED = "mt-cancelled"
ALL = [*DONE, UNACKED, UNCONFIRMED, CANCELLED]


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(
        # Scanner passes a second apart, so due rows wait and the lag gauges move.
        scanner={"interval": 1.0},
        checkback={"after": 0.2, "backoff_base": 0.1, "backoff_cap": 0.3, "max_tries": 3},
        redelivery={"ack_timeout": 0.3, "backoff_cap": 0.5, "max_attempts": 2},
        monitor={"interval": 0.2, "counts_interval": 0.2},
    )


@pytest.fixture
async def service(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> AsyncIterator[Instance]:
    config = write_config(settings, tmp_path / "config.toml")
    try:
        with running(config, tmp_path, env={"RMSG_LOG_FORMAT": "json"}) as [instance]:
            yield instance
    finally:
        await remove_traces(settings)


async def scrape(api: httpx.AsyncClient) -> Samples:
    r = await api.get("/metrics")
    assert r.status_code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(
        v
        for (n, sample_labels), v in samples.items()
        if n == name and all(dict(sample_labels).get(k) == w for k, w in labels.items())
    )


async def drive(api: httpx.AsyncClient) -> None:
    producer = auth(PRODUCER)
    for id in ALL:
        body = {"id": id, "topic": "order.paid", "payload": {"id": id}}
        assert (await api.post("/v1/messages", json=body, headers=producer)).status_code == 201
    for id in [*DONE, UNACKED]:
        assert (await api.post(f"/v1/messages/{id}/confirm", headers=producer)).is_success
    assert (await api.post(f"/v1/messages/{CANCELLED}/cancel", headers=producer)).is_success
    for token in GROUP_TOKENS.values():
        r = await api.post("/v1/batch/ack", json={"ids": DONE}, headers=auth(token))
        assert r.status_code == 200 and all(item["ok"] for item in r.json()["results"])


async def test_metrics_move_with_traffic(service: Instance, db: asyncpg.Connection) -> None:
    async with httpx.AsyncClient(base_url=service.url, timeout=10) as api:
        before = await scrape(api)
        await drive(api)

        lag: dict[str, float] = {"checkback": 0.0, "redelivery": 0.0}

        async def both_dead_and_counted() -> bool:
            # Until then rows fall due between two scanner passes: the lag gauges see it.
            samples = await scrape(api)
            for scanner in lag:
                seen = value(samples, "rmsg_scanner_lag_seconds", scanner=scanner)
                lag[scanner] = max(lag[scanner], seen)
            return value(samples, "rmsg_messages", status="dead") == 2

        await wait_until(both_dead_and_counted, within=20, every=0.1)
        after = await scrape(api)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("rmsg_transitions_total", status="pending") == 11
    assert moved("rmsg_transitions_total", status="sent") == 9
    assert moved("rmsg_transitions_total", status="cancelled") == 1
    assert moved("rmsg_transitions_total", status="dead") >= 1
    assert moved("rmsg_acks_total", group="inventory") == len(DONE)
    assert moved("rmsg_acks_total") == 3 * len(DONE)
    assert moved("rmsg_publish_seconds_count") >= 9 + 3  # first publishes, redeliveries
    assert moved("rmsg_confirm_seconds_count", caller="producer") == 9
    assert moved("rmsg_confirm_seconds_sum", caller="producer") > 0
    assert moved("rmsg_checkbacks_total", producer="order", outcome="error") >= 3
    assert moved("rmsg_redeliveries_total", group="wms") >= 1
    assert moved("rmsg_dead_total", reason="redelivery") >= 1
    assert moved("rmsg_dead_total", reason="checkback") == 1
    assert value(after, "rmsg_messages", status="done") == len(DONE)
    assert value(after, "rmsg_messages", status="cancelled") == 1
    assert value(after, "rmsg_deliveries", group="credit", status="done") == len(DONE)
    assert value(after, "rmsg_deliveries", group="credit", status="dead") == 1
    assert lag["checkback"] > 0 and lag["redelivery"] > 0, lag
    assert ("rmsg_degraded", ()) in after and value(after, "rmsg_degraded") == 0
    assert ("rmsg_fallback_depth", (("group", "inventory"),)) in after
    check_json_log(service.log)


def check_json_log(log: Path) -> None:
    """Every line is one JSON object; every line naming one of the test's messages (the
    redelivery, check-back and death of two of them) carries its id as ``message_id``."""
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert all({"ts", "level", "logger", "message"} <= set(line) for line in lines)
    about = {id: [line for line in lines if id in str(line["message"])] for id in ALL}
    assert about[UNACKED] and about[UNCONFIRMED], "no log line about the dead messages"
    for id, found in about.items():
        assert all(line.get("message_id") == id for line in found), found
