"""The e-commerce demo end to end: ``python -m demo`` as a process of its own, which runs
the service, the order service and the three consumers as processes and drives them over
HTTP, and stops RabbitMQ (``rabbitmqctl stop_app``) while a third of the orders is paid;
then its TCC part: a second service instance and the four TCC participants as processes,
with every planned fault. This test then reads both sets of books itself.

The run uses databases, RabbitMQ names and a Redis namespace of its own, removed
afterwards, so it neither sees nor disturbs a ``make demo`` run; the outage stops the
whole RabbitMQ application, though, as the degradation tests do, and the autouse fixture
in conftest starts it again whatever happens.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from demo.tcc.plan import Fault
from demo.tcc.shop import PARTICIPANTS
from reliable_msg.harness import servers
from reliable_msg.harness.ports import port_open
from tests.conftest import AMQP_URL, SERVER_URL
from tests.helpers.runs import GROUPS, isolated, own_names, run_group

ORDERS = 30
#: The runner's own budget; the test kills it (and its process group) after more.
RUNNER_TIMEOUT = 60
TEST_TIMEOUT = 170

pytestmark = pytest.mark.timeout(TEST_TIMEOUT + 30)


@pytest.fixture
def tag() -> Iterator[str]:
    """Names of this run's databases, RabbitMQ objects and Redis keys; all removed
    afterwards."""
    yield from own_names("rmsgdemotest")


#: The run's tokens, given rather than generated, so that the logs can be searched for them.
TOKENS = {
    f"DEMO_{name.upper()}_TOKEN": f"{name}-{secrets.token_urlsafe(18)}"
    for name in ("admin", "order", *GROUPS, *(f"tcc_{p}" for p in PARTICIPANTS))
}


def run_demo(tag: str, run_dir: Path) -> tuple[int, str]:
    argv = [
        *(sys.executable, "-m", "demo", "--orders", str(ORDERS)),
        *("--run-dir", str(run_dir), "--timeout", str(RUNNER_TIMEOUT)),
        *isolated(tag),
    ]
    # The service logs JSON, the order service and the consumers text: both formats.
    return run_group(argv, TEST_TIMEOUT, {**TOKENS, "DEMO_SERVICE_LOG_FORMAT": "json"})


def processes_of(tag: str) -> list[int]:
    """Live processes whose environment or command line names this run."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            seen = (entry / "environ").read_bytes() + (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if tag.encode() in seen:
            found.append(int(entry.name))
    return found


async def fetch(dsn: str, sql: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [dict(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()


async def read_orders(dsn: str) -> list[dict[str, Any]]:
    return await fetch(
        dsn,
        """
            SELECT o.id, o.status, p.available, p.sold, m.points,
                (SELECT count(*) FROM wms.delivery_orders d WHERE d.order_id = o.id) AS wms,
                (SELECT count(*) FROM inventory.rmsg_inbox i
                  WHERE i.message_id = 'order-' || o.id || '-paid') AS inventory_inbox,
                (SELECT count(*) FROM credit.rmsg_inbox i
                  WHERE i.message_id = 'order-' || o.id || '-paid') AS credit_inbox,
                (SELECT count(*) FROM wms.rmsg_inbox i
                  WHERE i.message_id = 'order-' || o.id || '-paid') AS wms_inbox
            FROM orders.orders o
            JOIN inventory.products p ON p.sku = o.sku
            JOIN credit.members m ON m.id = o.member_id
            ORDER BY o.id
            """,
    )


def test_demo_balances_the_books_through_every_injected_failure_and_an_outage(
    tag: str, tmp_path: Path
) -> None:
    code, out = run_demo(tag, tmp_path / "run")

    assert code == 0, out
    assert "\nverdict: BALANCED" in out, out
    assert "\nTCC verdict: BALANCED" in out, out
    assert "every injected TCC fault happened and healed as planned" in out, out
    assert processes_of(tag) == [], "the demo left processes behind"
    assert port_open(servers.RABBITMQ_PORT), "the demo left RabbitMQ stopped"
    assert asyncio.run(servers.rabbitmq_answers(AMQP_URL))

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert_no_token_logged(tmp_path / "run", out)
    assert_outage(summary["outage"], out)
    assert_metrics_moved(tmp_path / "run", summary)
    assert all(c["ok"] for c in summary["checks"]), summary["checks"]
    plan = summary["plan"]
    assert len(plan["local_failures"]) >= 1
    assert len(plan["upstream_crashes"]) >= 1
    assert all(len(plan["consumer_crashes"][g]) >= 1 for g in GROUPS)
    assert summary["restarts"] == {
        "service": 0,
        "order": len(plan["upstream_crashes"]),
        **{g: len(plan["consumer_crashes"][g]) for g in GROUPS},
    }

    orders = asyncio.run(read_orders(f"{SERVER_URL}/{tag}"))
    assert len(orders) == ORDERS
    paid = [o for o in orders if o["status"] == "paid"]
    unpaid = [o for o in orders if o["status"] != "paid"]
    assert {o["id"] for o in unpaid} == set(plan["local_failures"])
    assert set(plan["upstream_crashes"]) <= {o["id"] for o in paid}
    for o in paid:  # exactly one effect in each book, however often the message came
        assert (o["available"], o["sold"], o["points"], o["wms"]) == (98, 2, 1200, 1), o
        assert (o["inventory_inbox"], o["credit_inbox"], o["wms_inbox"]) == (1, 1, 1), o
    for o in unpaid:  # no effect at all
        assert (o["available"], o["sold"], o["points"], o["wms"]) == (100, 0, 1190, 0), o
        assert (o["inventory_inbox"], o["credit_inbox"], o["wms_inbox"]) == (0, 0, 0), o
    assert_tcc(summary["tcc"], asyncio.run(read_tcc_orders(f"{SERVER_URL}/{tag}")))


async def read_tcc_orders(dsn: str) -> list[dict[str, Any]]:
    return await fetch(
        dsn,
        """
            SELECT o.id, o.status, p.available, p.frozen, p.sold, m.points,
                   m.prepare_add_credit AS prepared,
                   array(SELECT d.status FROM tcc_wms.sale_delivery_orders d
                         WHERE d.order_id = o.id ORDER BY d.status) AS deliveries
            FROM tcc_order.orders o
            JOIN tcc_inventory.products p ON p.sku = o.sku
            JOIN tcc_credit.members m ON m.id = o.member_id
            ORDER BY o.id
            """,
    )


def assert_tcc(tcc: dict[str, Any], orders: list[dict[str, Any]]) -> None:
    """Every planned fault met its order; every order is PAYED with its four effects or
    CANCELED with none; the coordinator instance killed mid-confirm was not the one that
    finished."""
    assert tcc["balanced"] and tcc["as_planned"], tcc["checks"]
    assert all(c["ok"] for c in tcc["checks"]), tcc["checks"]
    faults = {int(i): Fault(f) for i, f in tcc["faults"].items()}
    assert sorted(faults.values()) == sorted(Fault)
    assert tcc["restarts"] == {"tcc-order": 1, "tcc-inventory": 0, "tcc-credit": 0, "tcc-wms": 1}
    assert tcc["killed"]["status"] == "confirming"
    for o in orders:
        fault = faults.get(o["id"])
        if fault is None or fault.payed:
            assert o["status"] == "PAYED", o
            assert (o["available"], o["frozen"], o["sold"]) == (98, 0, 2), o
            assert (o["points"], o["prepared"], o["deliveries"]) == (1200, 0, ["CREATED"]), o
        else:
            assert o["status"] == "CANCELED", o
            stock = (0, 0, 100) if fault is Fault.REFUSED else (100, 0, 0)
            assert (o["available"], o["frozen"], o["sold"]) == stock, o
            assert (o["points"], o["prepared"]) == (1190, 0), o
            assert set(o["deliveries"]) <= {"CANCELED"}, o


def assert_no_token_logged(run_dir: Path, out: str) -> None:
    """No configured token in any line any process of the run logged (the service in
    JSON, the others in text), nor in the report, the metrics or the demo's own output;
    and the run used these very tokens (its summary has their fingerprints)."""
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    logs = {p.name: p.read_text(errors="replace") for p in files if p.suffix == ".log"}
    assert {"service.log", "order.log", *(f"{g}.log" for g in GROUPS)} <= set(logs), logs
    service = [line for line in logs["service.log"].splitlines() if line.startswith("{")]
    assert len(service) > 50, "the service did not log JSON"
    assert all(json.loads(line)["message"] for line in service)
    assert any("WARNING" in line for line in logs["inventory.log"].splitlines())  # text
    texts = {str(p): p.read_text(errors="replace") for p in files}
    texts["demo output"] = out
    for name, token in TOKENS.items():
        for where, text in texts.items():
            assert token not in text, f"{name} is in {where}"
    used = json.loads((run_dir / "summary.json").read_text())["tokens"]
    given = {
        name.removeprefix("DEMO_").removesuffix("_TOKEN").lower(): token
        for name, token in TOKENS.items()
    }
    assert used == {n: hashlib.sha256(t.encode()).hexdigest()[:12] for n, t in given.items()}


def assert_outage(outage: dict[str, Any], out: str) -> None:
    """RabbitMQ went down and came back; meanwhile orders were paid through Redis; the
    switch flipped to degraded and back; every consumer went to Redis and came back."""
    assert outage is not None
    assert 0 < outage["stopped_at"] < outage["started_at"] <= outage["answering_at"]
    assert outage["paid"] > 0
    assert outage["paid"] == outage["planned_paid"]
    assert outage["settled"] == outage["planned_settled"], "not handled through Redis while down"
    assert [f["mode"] for f in outage["history"]][:2] == ["degraded", "normal"]
    assert outage["history"][-1]["mode"] == "normal"
    assert outage["history"][0]["by"].startswith("the service (")
    assert outage["mode"] == "normal"
    assert outage["depth"] == dict.fromkeys(GROUPS, 0)
    for group in GROUPS:
        assert outage["writes"][group] >= outage["confirmed"] > 0
        path = outage["paths"][group]
        assert path["to_redis"] >= 1 and path["to_rabbitmq"] >= 1, (group, path)
        assert path["now"] == "RabbitMQ", (group, path)
    for row in ("RabbitMQ stopped", "RabbitMQ started", "switch set degraded by the service"):
        assert row in out, row


def documented_metrics() -> list[str]:
    """The metric names of the README's table under "### Metrics"."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Metrics", 1)[1].split("\n#", 1)[0]
    names = re.findall(r"^\| `(rmsg_\w+)` \|", section, re.MULTILINE)
    assert len(names) >= 10, section
    return names


class Scrape:
    """One ``/metrics`` text: which metrics it declares, and its samples."""

    def __init__(self, text: str) -> None:
        self.declared = set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))
        self.samples = [s for f in text_string_to_metric_families(text) for s in f.samples]

    def values(self, name: str, **labels: str) -> list[float]:
        return [
            s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items()
        ]

    def value(self, name: str, **labels: str) -> float:
        found = self.values(name, **labels)
        assert found, f"no sample {name} {labels}"
        return sum(found)


def assert_metrics_moved(run_dir: Path, summary: dict[str, Any]) -> None:
    """The service's /metrics while RabbitMQ was down and at the end: every documented
    metric is there, and what this run must have moved moved. (The service process is the
    run's own, so every counter started at zero.)"""
    during = Scrape((run_dir / "metrics-outage.txt").read_text())
    end = Scrape((run_dir / "metrics-end.txt").read_text())
    for name in documented_metrics():
        assert name in during.declared and name in end.declared, name
    plan = summary["plan"]
    paid = ORDERS - len(plan["local_failures"])

    assert during.value("rmsg_degraded") == 1
    assert during.value("rmsg_mode_changes_total", mode="degraded") >= 1
    for group in GROUPS:
        assert during.value("rmsg_fallback_writes_total", group=group) >= 1, group
        assert len(during.values("rmsg_fallback_depth", group=group)) == 1, group

    assert end.value("rmsg_transitions_total", status="pending") == ORDERS
    assert end.value("rmsg_transitions_total", status="sent") == paid
    assert end.value("rmsg_transitions_total", status="cancelled") == len(plan["local_failures"])
    assert end.value("rmsg_publish_seconds_count") > 0
    assert end.value("rmsg_confirm_seconds_count", caller="producer") > 0
    # Orders whose service died after its commit are confirmed by check-back.
    assert end.value("rmsg_confirm_seconds_count", caller="checkback") >= 1
    committed = end.value("rmsg_checkbacks_total", producer="order", outcome="committed")
    assert committed >= len(plan["upstream_crashes"])
    assert end.value("rmsg_degraded") == 0
    assert end.value("rmsg_mode_changes_total", mode="degraded") >= 1
    assert end.value("rmsg_mode_changes_total", mode="normal") >= 1
    assert end.value("rmsg_messages", status="done") > 0
    for group in GROUPS:
        assert end.value("rmsg_acks_total", group=group) == paid, group
        writes = end.value("rmsg_fallback_writes_total", group=group)
        assert writes == summary["outage"]["writes"][group], group
        assert end.value("rmsg_fallback_depth", group=group) == 0, group
        assert end.value("rmsg_deliveries", group=group, status="done") > 0, group
    for scanner in ("checkback", "redelivery"):
        assert len(end.values("rmsg_scanner_lag_seconds", scanner=scanner)) == 1, scanner
