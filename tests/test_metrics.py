"""``/metrics`` of a real service process moves with the traffic it serves (messages and
TCC transactions), and its JSON log (``RMSG_LOG_FORMAT=json``) names the message of
every line about a message, and the gid of a stalled transaction."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from reliable_msg.harness.ports import free_port
from reliable_msg.service.settings import Settings
from tests.conftest import GROUP_TOKENS, PRODUCER, auth
from tests.helpers import tcc as tcc_rows
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


async def test_tcc_metrics_count_transactions_calls_and_the_stalled(
    make_settings: Callable[..., Settings],
    db: asyncpg.Connection,
    pool: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    """A real service process drives TCC transactions (written straight into its tables)
    against a participant served here and one that is down: ``/metrics`` counts them by
    status, its calls by op and outcome, the oldest unfinished and the stalled one, and
    its JSON log names the stalled transaction's gid."""
    await tcc_rows.reset(db)
    down = f"http://127.0.0.1:{free_port()}"
    async with tcc_rows.serving(tcc_rows.sdk_app(tcc_rows.participant(pool, "inventory"))) as up:
        urls = {"inventory": f"{up}/inventory", "credit": f"{down}/credit"}
        participants = {n: {"url": u, "token": tcc_rows.TOKENS[n]} for n, u in urls.items()}
        settings = make_settings(
            participants=participants,
            scanner={"interval": 0.2},
            monitor={"interval": 0.2, "counts_interval": 0.2},
            tcc={"stalled_after": 600, "backoff_base": 0.2, "backoff_cap": 0.5},
        )
        config = write_config(settings, tmp_path / "config.toml", participants=participants)
        await tcc_rows.insert(db, "t-ok", "confirming", [("b1", "inventory"), ("b2", "inventory")])
        await tcc_rows.insert(db, "t-stuck", "cancelling", [("b1", "credit")], age=3600)
        await tcc_rows.insert(db, "t-trying", "trying", [("b1", "inventory")], age=5)
        try:
            with running(config, tmp_path, env={"RMSG_LOG_FORMAT": "json"}) as [instance]:
                async with httpx.AsyncClient(base_url=instance.url, timeout=10) as api:

                    async def counted() -> bool:
                        samples = await scrape(api)
                        return (
                            value(samples, "rmsg_tcc_transactions", status="confirmed") == 1
                            and value(samples, "rmsg_tcc_stalled") == 1
                            and value(samples, "rmsg_tcc_branch_calls_total", outcome="failed") >= 2
                        )

                    await wait_until(counted, within=20, every=0.2)
                    after = await scrape(api)
        finally:
            await remove_traces(settings)
    assert value(after, "rmsg_tcc_transactions", status="trying") == 1
    assert value(after, "rmsg_tcc_transactions", status="cancelling") == 1
    assert value(after, "rmsg_tcc_transactions", status="confirming") == 0
    ok = value(after, "rmsg_tcc_branch_calls_total", op="confirm", outcome="ok")
    assert ok == 2 and value(after, "rmsg_tcc_branch_calls_total", op="cancel", outcome="ok") == 0
    assert value(after, "rmsg_tcc_branch_calls_total", op="cancel", outcome="failed") >= 2
    assert value(after, "rmsg_tcc_oldest_unfinished_seconds") >= 3600
    lines = [json.loads(line) for line in instance.log.read_text().splitlines() if line.strip()]
    stalled = [
        line for line in lines if line["level"] == "warning" and "stalled" in line["message"]
    ]
    assert [line.get("gid") for line in stalled] == ["t-stuck"]
