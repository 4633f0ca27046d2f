"""The short soak run in full: ``python -m soak --short`` as a process of its own, with
two service instances, the order service, three consumers, three TCC participants and
initiators of TCC transactions beside the payments, while it kills instances and
participants, closes RabbitMQ's connections, stops its application, terminates
PostgreSQL backends, restarts the PostgreSQL server, stalls and cuts the network to
RabbitMQ and to a participant, and kills an initiator between its Trys and its commit.
Then this test checks the run's report and reads the books itself: the business
databases and the service's database, order by order, and the coordinator's rows and
the participants' logs of handler runs, transaction by transaction, trusting nothing
the run says about them.

The run uses databases, RabbitMQ names and a Redis namespace of its own, removed
afterwards. The faults hit the shared servers, though; the run gives back what it took
and the autouse fixture in conftest checks RabbitMQ and Redis again whatever happens.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from demo import books
from demo.books import OrderRow
from demo.verdict import EFFECTS
from reliable_msg.harness import tcc_party
from reliable_msg.harness.ports import port_open
from soak.options import SHORT_CRASHES, SHORT_FAULTS, SHORT_TRANSACTIONS
from soak.plan import Kind
from tests.conftest import SERVER_URL
from tests.helpers.runs import GROUPS, isolated, own_names, run_group
from upstream_demo.store import message_id

#: The runner's own wait for quiescence; the test kills it (and its process group) after
#: the test's budget.
RUNNER_TIMEOUT = 120
TEST_TIMEOUT = 300

pytestmark = pytest.mark.timeout(TEST_TIMEOUT + 30)


@pytest.fixture
def tag() -> Iterator[str]:
    yield from own_names("rmsgsoaktest")


def run_soak(tag: str, run_dir: Path) -> tuple[int, str]:
    argv = [
        *(sys.executable, "-m", "soak", "--short", "--seed", "5"),
        *("--run-dir", str(run_dir), "--timeout", str(RUNNER_TIMEOUT)),
        *isolated(tag),
    ]
    return run_group(argv, TEST_TIMEOUT)


def test_the_short_soak_loses_nothing_and_applies_nothing_twice(tag: str, tmp_path: Path) -> None:
    code, out = run_soak(tag, tmp_path)
    assert code == 0, out[-6000:]
    assert "PASSED" in out
    report: dict[str, Any] = json.loads((tmp_path / "report.json").read_text())

    # Every fault of the environment was injected, each kind at least once.
    assert report["faults_injected"] == SHORT_FAULTS, report["faults"]
    kinds = {f["label"].split()[0] for f in report["faults"]}
    assert kinds == {k.value for k in Kind}
    # The planned kills happened: each process was restarted at least as often.
    for name, kills in report["planned_kills"].items():
        assert kills >= 1 or name.startswith(("service-", "tcc-")), report["planned_kills"]
        assert report["restarts"][name] >= kills, (name, report["restarts"])

    assert report["lost"] == report["duplicated"] == report["phantom"] == 0
    assert report["stuck"] == 0
    assert report["committed"] > 0 and report["cancelled"] > 0
    assert report["effects"] == {g: report["committed"] for g in GROUPS}

    # The books, read here rather than trusted from the report: the business databases
    # and the service's own, which must agree order by order.
    held = asyncio.run(books.read(f"{SERVER_URL}/{tag}", GROUPS))
    service = asyncio.run(read_service(f"{SERVER_URL}/{tag}_service"))
    inboxes = asyncio.run(read_inboxes(f"{SERVER_URL}/{tag}"))
    paid = [r for r in held.orders if r.status == "paid"]
    assert paid, "nothing was paid"
    for row in held.orders:
        expected = 1 if row.status == "paid" else 0
        assert [EFFECTS[g](row) for g in GROUPS] == [expected] * 3, row
    assert_the_service_agrees(held.orders, service, inboxes)
    assert len(paid) == report["committed"]

    tcc = report["tcc"]
    assert tcc["half_done"] == tcc["applied_twice"] == tcc["stuck"] == 0, tcc
    assert tcc["contradicted"] == tcc["accounts_off"] == 0, tcc
    assert tcc["committed"] > 0 and tcc["cancelled"] > 0, tcc
    assert tcc["initiators"]["refused"] > 0 and tcc["initiators_killed"] == SHORT_CRASHES, tcc
    assert tcc["expired"] >= SHORT_CRASHES, tcc  # the killed initiators' deadlines cancelled
    final = asyncio.run(read_tcc(f"{SERVER_URL}/{tag}", f"{SERVER_URL}/{tag}_service"))
    assert final.keys() >= {f"soak-5-{i}" for i in range(SHORT_TRANSACTIONS)}
    assert sum(s == "confirmed" for s in final.values()) == tcc["committed"]

    # Whatever the faults took away is back.
    assert port_open(5672)


#: Per message id: its status and each group's delivery status.
ServiceBooks = dict[str, tuple[str, dict[str, str]]]


async def fetch_all(dsn: str, *queries: str) -> list[list[asyncpg.Record]]:
    """The rows of each of ``queries``, on one connection to ``dsn``."""
    conn = await asyncpg.connect(dsn)
    try:
        return [await conn.fetch(q) for q in queries]
    finally:
        await conn.close()


async def read_service(dsn: str) -> ServiceBooks:
    messages, deliveries = await fetch_all(
        dsn,
        "SELECT id, status FROM rmsg_message",
        "SELECT message_id, group_name, status FROM rmsg_delivery",
    )
    found: ServiceBooks = {r["id"]: (r["status"], {}) for r in messages}
    for d in deliveries:
        found[d["message_id"]][1][d["group_name"]] = d["status"]
    return found


async def read_inboxes(dsn: str) -> dict[str, Counter[str]]:
    """How often each message id is in each group's inbox."""
    conn = await asyncpg.connect(dsn)
    try:
        return {
            g: Counter(
                r["message_id"] for r in await conn.fetch(f"SELECT message_id FROM {g}.rmsg_inbox")
            )
            for g in GROUPS
        }
    finally:
        await conn.close()


async def read_tcc(database_url: str, service_database_url: str) -> dict[str, str]:
    """Every TCC transaction's status, once checked against its branches at the
    coordinator and the handler runs at each participant: confirmed, each branch tried
    and confirmed once; cancelled, each branch tried and cancelled once or never tried;
    no run of anything else."""
    txs, branches = await fetch_all(
        service_database_url,
        "SELECT gid, status FROM rmsg_tcc_transaction",
        "SELECT gid, branch, participant, status FROM rmsg_tcc_branch",
    )
    conn = await asyncpg.connect(database_url)
    try:
        runs = await tcc_party.tally(conn, {b["participant"] for b in branches})
    finally:
        await conn.close()
    status = {t["gid"]: t["status"] for t in txs}
    assert runs.gids() <= set(status), "a participant ran a handler of a stranger"
    for b in branches:
        s = status[b["gid"]]
        assert b["status"] == s, (dict(b), s)
        ops = runs.ops(b["gid"]).get((b["participant"], b["branch"]), {})
        if s == "confirmed":
            assert ops == {"try": 1, "confirm": 1}, (dict(b), ops)
        else:
            assert s == "cancelled" and ops in ({}, {"try": 1, "cancel": 1}), (dict(b), ops)
    return status


def assert_the_service_agrees(
    orders: list[OrderRow], service: ServiceBooks, inboxes: dict[str, Counter[str]]
) -> None:
    """A paid order's message is ``done``, acked by every group, in each group's inbox
    once; an unpaid order's is ``cancelled`` or was never prepared, and in no inbox; the
    service and the inboxes hold no other message, so nothing is pending, sent or dead."""
    ids = {message_id(row.id): row for row in orders}
    assert set(service) <= set(ids), set(service) - set(ids)
    for id, row in ids.items():
        status, deliveries = service.get(id, (None, {}))
        if row.status == "paid":
            assert (status, deliveries) == ("done", dict.fromkeys(GROUPS, "done")), (row, status)
            assert [inboxes[g][id] for g in GROUPS] == [1, 1, 1], row
        else:
            assert status in (None, "cancelled") and not deliveries, (row, status)
            assert [inboxes[g][id] for g in GROUPS] == [0, 0, 0], row
    assert all(set(inboxes[g]) <= set(ids) for g in GROUPS), "an inbox holds a stranger"
