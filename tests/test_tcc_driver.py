"""The TCC driver against real PostgreSQL and participants served over real HTTP: every
branch confirmed or cancelled exactly once, failures retried with a capped, jittered
backoff on the database's clock, a stuck branch holding none of the others, leases
keeping two instances apart, and stalled transactions flagged."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client import REGISTRY

from reliable_msg.harness.ports import free_port
from reliable_msg.sdk import tcc
from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from reliable_msg.service.tcc.driver import Driver
from reliable_msg.service.tcc.driving import Driving
from reliable_msg.tcc import BRANCH_HEADER, GID_HEADER, OP_HEADER, Op, proof
from tests.conftest import PRODUCER
from tests.helpers.tcc import (
    TOKENS,
    Scripted,
    branch,
    events,
    insert,
    insert_many,
    participant,
    reset,
    sdk_app,
    serving,
    transaction,
)
from tests.helpers.waiting import wait_until


@pytest.fixture
async def tcc_db(db: asyncpg.Connection) -> asyncpg.Connection:
    await reset(db)
    return db


@pytest.fixture
async def sdk_url(pool: asyncpg.Pool, tcc_db: asyncpg.Connection) -> AsyncIterator[str]:
    """The inventory and credit SDK participants, on one server."""
    app = sdk_app(participant(pool, "inventory"), participant(pool, "credit"))
    async with serving(app) as url:
        yield url


@pytest.fixture
async def scripted(tcc_db: asyncpg.Connection) -> AsyncIterator[tuple[Scripted, str]]:
    """A misbehaving credit participant and its server's URL."""
    credit = Scripted("credit")
    async with serving(credit.app()) as url:
        try:
            yield credit, url
        finally:  # a held call ends, so that the server can stop
            credit.released.set()


def configure(
    make_settings: Callable[..., Settings], urls: dict[str, str], **overrides: Any
) -> Settings:
    """Settings declaring each participant of ``urls`` (name -> server URL)."""
    participants = {
        name: {"url": f"{url}/{name}", "token": TOKENS[name]} for name, url in urls.items()
    }
    return make_settings(participants=participants, **overrides)


@asynccontextmanager
async def driver(settings: Settings, instance: str = "driver-a") -> AsyncIterator[Driver]:
    """A started driver on a pool of its own, named ``instance``."""
    driving = await Driving.connect(settings.database_url, pool_size=8)
    d = Driver(settings, driving, instance=instance)
    await d.start()
    try:
        yield d
    finally:
        await d.stop()
        await driving.close()


async def effects(db: asyncpg.Connection) -> Counter[tuple[str, str, str, str]]:
    rows = await db.fetch("SELECT participant, gid, branch, op FROM tcc_effects")
    return Counter(tuple(r) for r in rows)


async def barrier(db: asyncpg.Connection) -> set[tuple[str, str, str, str]]:
    rows = await db.fetch(f"SELECT gid, branch, op, origin FROM {tcc.BARRIER_TABLE}")
    return {(r["gid"], r["branch"], r["op"], r["origin"]) for r in rows}


TX = "/v1/tcc/transactions"
#: The branches of the API test: (branch, participant).
BRANCHES = [("b1", "inventory"), ("b2", "credit")]


async def status_is(db: asyncpg.Connection, gid: str, status: str) -> bool:
    return await status_of(db, gid) == status


async def claims(d: Driver) -> bool:
    """One pass of ``d`` claimed something (for :func:`wait_until`)."""
    return await d.run_once() > 0


async def status_of(db: asyncpg.Connection, gid: str, name: str | None = None) -> str:
    """The status of transaction ``gid``, or of its branch ``name``."""
    row = await (transaction(db, gid) if name is None else branch(db, gid, name))
    return str(row["status"])


def summary(rows: list[asyncpg.Record]) -> list[tuple[Any, ...]]:
    return [(r["branch"], r["op"], r["outcome"], r["http_status"]) for r in rows]


async def test_every_branch_is_confirmed_exactly_once(
    make_settings: Callable[..., Settings], sdk_url: str, tcc_db: asyncpg.Connection
) -> None:
    settings = configure(make_settings, {"inventory": sdk_url, "credit": sdk_url})
    branches = [("b1", "inventory"), ("b2", "credit"), ("b3", "inventory")]
    await insert(tcc_db, "g1", "confirming", branches)
    async with driver(settings) as d:
        assert await d.run_once() == 1
        assert await d.run_once() == 0
    tx = await transaction(tcc_db, "g1")
    assert (tx["status"], tx["attempts"], tx["lease_owner"], tx["next_try_at"]) == (
        "confirmed",
        1,
        None,
        None,
    )
    assert tx["finished_at"] is not None and tx["updated_at"] > tx["created_at"]
    for name, _ in branches:
        row = await branch(tcc_db, "g1", name)
        assert (row["status"], row["attempts"], row["last_status"]) == ("confirmed", 1, 200)
    log = await events(tcc_db, "g1")
    assert sorted(summary(log[:3])) == [(b, "confirm", "ok", 200) for b, _ in branches]
    assert summary(log[3:]) == [(None, "confirmed", "ok", None)]
    assert {r["instance"] for r in log} == {"driver-a"}
    assert await effects(tcc_db) == {
        ("inventory", "g1", "b1", "confirm"): 1,
        ("credit", "g1", "b2", "confirm"): 1,
        ("inventory", "g1", "b3", "confirm"): 1,
    }
    assert {(b, op) for _, b, op, _ in await barrier(tcc_db)} == {
        (b, "confirm") for b, _ in branches
    }


async def test_cancel_calls_every_branch_and_an_untried_one_is_an_empty_rollback(
    make_settings: Callable[..., Settings], sdk_url: str, tcc_db: asyncpg.Connection
) -> None:
    settings = configure(make_settings, {"inventory": sdk_url, "credit": sdk_url})
    await insert(tcc_db, "g2", "cancelling", [("tried", "inventory"), ("untried", "credit")])
    async with httpx.AsyncClient() as http:  # the initiator's Try of one branch only
        body = {"gid": "g2", "branch": "tried", "op": "try", "payload": {"qty": 1}}
        headers = {
            GID_HEADER: "g2",
            BRANCH_HEADER: "tried",
            OP_HEADER: "try",
            "Authorization": f"Bearer {proof(TOKENS['inventory'], 'g2', 'tried', Op.TRY)}",
        }
        response = await http.post(f"{sdk_url}/inventory/try", json=body, headers=headers)
        assert response.status_code == 200, response.text
    async with driver(settings) as d:
        assert await d.run_once() == 1
    assert (await transaction(tcc_db, "g2"))["status"] == "cancelled"
    assert await barrier(tcc_db) == {
        ("g2", "tried", "try", "try"),
        ("g2", "tried", "cancel", "cancel"),
        ("g2", "untried", "try", "cancel"),  # the empty rollback, recorded
        ("g2", "untried", "cancel", "cancel"),
    }
    assert await effects(tcc_db) == {
        ("inventory", "g2", "tried", "try"): 1,
        ("inventory", "g2", "tried", "cancel"): 1,
    }
    log = summary(await events(tcc_db, "g2"))
    assert sorted(log[:2]) == [("tried", "cancel", "ok", 200), ("untried", "cancel", "ok", 200)]
    assert log[2:] == [(None, "cancelled", "ok", None)]


async def test_a_trying_transaction_past_its_deadline_is_cancelled(
    make_settings: Callable[..., Settings], sdk_url: str, tcc_db: asyncpg.Connection
) -> None:
    settings = configure(make_settings, {"inventory": sdk_url})
    await insert(tcc_db, "late", "trying", [("b1", "inventory")], age=10, deadline_in=-1)
    await insert(tcc_db, "in-time", "trying", [("b1", "inventory")])
    async with driver(settings) as d:
        assert await d.run_once() == 1
    late = await transaction(tcc_db, "late")
    assert (late["status"], late["attempts"]) == ("cancelled", 1)
    assert summary(await events(tcc_db, "late")) == [
        (None, "expire", "ok", None),
        ("b1", "cancel", "ok", 200),
        (None, "cancelled", "ok", None),
    ]
    assert (await transaction(tcc_db, "in-time"))["status"] == "trying"
    assert await events(tcc_db, "in-time") == []
    assert await barrier(tcc_db) == {
        ("late", "b1", "try", "cancel"),
        ("late", "b1", "cancel", "cancel"),
    }


async def test_failed_calls_are_retried_with_a_capped_jittered_backoff(
    make_settings: Callable[..., Settings],
    sdk_url: str,
    scripted: tuple[Scripted, str],
    tcc_db: asyncpg.Connection,
) -> None:
    credit, credit_url = scripted
    credit.answers = [500] * 5
    base, cap, jitter = 0.1, 0.3, 0.5
    settings = configure(
        make_settings,
        {"inventory": sdk_url, "credit": credit_url},
        tcc={"backoff_base": base, "backoff_cap": cap, "jitter": jitter},
    )
    await insert(tcc_db, "g3", "confirming", [("ok", "inventory"), ("flaky", "credit")])
    ratios = []
    async with driver(settings) as d:
        for attempt in range(1, 6):
            await wait_until(lambda: claims(d), within=5, every=0.05)
            row = await branch(tcc_db, "g3", "flaky")
            tx = await transaction(tcc_db, "g3")
            assert (row["status"], row["attempts"], row["last_status"]) == (
                "registered",
                attempt,
                500,
            )
            assert row["last_error"].startswith("HTTP 500: ")
            assert (tx["status"], tx["attempts"]) == ("confirming", attempt)
            assert tx["next_try_at"] == row["next_try_at"] and tx["lease_owner"] is None
            wait = (row["next_try_at"] - row["updated_at"]).total_seconds()
            expected = min(cap, base * 2 ** (attempt - 1))
            assert expected * (1 - jitter) <= wait <= expected * (1 + jitter), (attempt, wait)
            ratios.append(wait / expected)
        await wait_until(lambda: claims(d), within=5, every=0.05)
    assert len(set(ratios)) > 1, ratios  # drawn, not fixed
    assert (await transaction(tcc_db, "g3"))["status"] == "confirmed"
    flaky = await branch(tcc_db, "g3", "flaky")
    assert (flaky["status"], flaky["attempts"], flaky["last_status"]) == ("confirmed", 6, 200)
    assert credit.calls == [("g3", "flaky", "confirm")] * 6
    assert await effects(tcc_db) == {("inventory", "g3", "ok", "confirm"): 1}
    log = summary(await events(tcc_db, "g3"))
    assert log.count(("flaky", "confirm", "failed", 500)) == 5
    assert log.count(("ok", "confirm", "ok", 200)) == 1
    assert log[-2:] == [("flaky", "confirm", "ok", 200), (None, "confirmed", "ok", None)]


async def test_a_hanging_branch_does_not_delay_recording_the_others(
    make_settings: Callable[..., Settings],
    sdk_url: str,
    scripted: tuple[Scripted, str],
    tcc_db: asyncpg.Connection,
) -> None:
    credit, credit_url = scripted
    credit.hold = True
    settings = configure(make_settings, {"inventory": sdk_url, "credit": credit_url})
    settings = settings.model_copy(
        update={
            "participants": {
                **settings.participants,
                "credit": settings.participants["credit"].model_copy(update={"timeout": 3.0}),
            }
        }
    )
    await insert(tcc_db, "g4", "confirming", [("fast", "inventory"), ("stuck", "credit")])
    async with driver(settings) as d:
        running = asyncio.create_task(d.run_once())
        await asyncio.wait_for(credit.holding.wait(), 5)

        async def fast_recorded() -> bool:
            return await status_of(tcc_db, "g4", "fast") == "confirmed"

        await wait_until(fast_recorded, within=5, every=0.02)
        assert not running.done() and not credit.released.is_set()  # still held
        assert summary(await events(tcc_db, "g4")) == [("fast", "confirm", "ok", 200)]
        assert await running == 1
    stuck = await branch(tcc_db, "g4", "stuck")
    assert (stuck["status"], stuck["attempts"], stuck["last_status"]) == ("registered", 1, None)
    assert stuck["last_error"] == "timeout after 3 s"
    last = (await events(tcc_db, "g4"))[-1]
    assert (last["branch"], last["outcome"], last["http_status"], last["error"]) == (
        "stuck",
        "failed",
        None,
        "timeout after 3 s",
    )


async def test_a_participant_not_declared_is_never_called(
    make_settings: Callable[..., Settings], sdk_url: str, tcc_db: asyncpg.Connection
) -> None:
    settings = configure(make_settings, {"inventory": sdk_url})
    await insert(tcc_db, "g5", "confirming", [("b1", "inventory"), ("b2", "ghost")])
    async with driver(settings) as d:
        assert await d.run_once() == 1
    ghost = await branch(tcc_db, "g5", "b2")
    assert (ghost["status"], ghost["attempts"], ghost["last_status"]) == ("registered", 1, None)
    assert ghost["last_error"] == "participant 'ghost' is not declared"
    assert (await branch(tcc_db, "g5", "b1"))["status"] == "confirmed"


async def test_retry_now_makes_a_waiting_transaction_due_at_once(
    make_settings: Callable[..., Settings],
    scripted: tuple[Scripted, str],
    tcc_db: asyncpg.Connection,
) -> None:
    credit, credit_url = scripted
    credit.answers = [503]
    settings = configure(
        make_settings, {"credit": credit_url}, tcc={"backoff_base": 600, "backoff_cap": 600}
    )
    await insert(tcc_db, "g6", "confirming", [("b1", "credit")])
    async with driver(settings) as d:
        assert await d.run_once() == 1
        assert await d.run_once() == 0  # waiting for its backoff: ten minutes
        assert (await branch(tcc_db, "g6", "b1"))["last_status"] == 503
        # What the admin's "retry now" does: the waits reset.
        await tcc_db.execute("UPDATE rmsg_tcc_transaction SET next_try_at = NULL")
        await tcc_db.execute("UPDATE rmsg_tcc_branch SET next_try_at = NULL")
        assert await d.run_once() == 1
    assert (await transaction(tcc_db, "g6"))["status"] == "confirmed"
    assert len(credit.calls) == 2


async def test_a_kick_drives_one_transaction_now(
    make_settings: Callable[..., Settings], sdk_url: str, tcc_db: asyncpg.Connection
) -> None:
    settings = configure(make_settings, {"inventory": sdk_url})
    await insert(tcc_db, "kicked", "confirming", [("b1", "inventory")])
    await insert(tcc_db, "other", "confirming", [("b1", "inventory")])
    async with driver(settings) as d:
        d.kick("kicked")

        async def confirmed() -> bool:
            return await status_of(tcc_db, "kicked") == "confirmed"

        await wait_until(confirmed, within=5)
    assert (await transaction(tcc_db, "other"))["status"] == "confirming"


async def test_a_leased_transaction_is_not_claimed_until_its_lease_ends(
    make_settings: Callable[..., Settings], sdk_url: str, tcc_db: asyncpg.Connection
) -> None:
    settings = configure(make_settings, {"inventory": sdk_url})
    await insert(tcc_db, "g7", "confirming", [("b1", "inventory")])
    first = await Driving.connect(settings.database_url, pool_size=2)
    try:
        [claimed] = await first.claim("driver-a", 1.0, 10)  # and driver-a dies mid-round
    finally:
        await first.close()
    assert claimed.gid == "g7" and [b.branch for b in claimed.branches] == ["b1"]
    async with driver(settings, "driver-b") as b:
        assert await b.run_once() == 0
        kicked = b.drive("g7")  # a kick, claimed the same way: nothing either
        assert kicked is not None
        await kicked
        assert (await transaction(tcc_db, "g7"))["lease_owner"] == "driver-a"
        assert await events(tcc_db, "g7") == []
        await wait_until(lambda: claims(b), within=5, every=0.05)
    tx = await transaction(tcc_db, "g7")
    assert (tx["status"], tx["lease_owner"]) == ("confirmed", None)
    assert {r["instance"] for r in await events(tcc_db, "g7")} == {"driver-b"}
    assert sum((await effects(tcc_db)).values()) == 1


async def test_a_round_ending_after_its_lease_leaves_the_new_holder_s_lease(
    make_settings: Callable[..., Settings], tcc_db: asyncpg.Connection
) -> None:
    settings = make_settings()
    await insert(tcc_db, "g9", "confirming", [("b1", "inventory")])
    driving = await Driving.connect(settings.database_url, pool_size=2)
    try:
        [late] = await driving.claim("driver-a", 0.2, 10)

        async def taken_over() -> bool:
            return bool(await driving.claim("driver-b", 30.0, 10))

        await wait_until(taken_over, within=5, every=0.05)  # driver-a's lease ended
        assert not await driving.end_round(late, "driver-a", "driver-a", called=True)
    finally:
        await driving.close()
    tx = await transaction(tcc_db, "g9")
    assert (tx["lease_owner"], tx["attempts"], tx["status"]) == ("driver-b", 0, "confirming")


async def test_a_round_that_fails_to_record_releases_its_lease_at_once(
    make_settings: Callable[..., Settings], sdk_url: str, tcc_db: asyncpg.Connection
) -> None:
    """The database refuses the round's end (its attempts count): the lease is released
    at once (not held for ``tcc.lease``) with nothing else written, and the next pass
    claims the transaction."""
    settings = configure(make_settings, {"inventory": sdk_url}, tcc={"lease": 30})
    await insert(tcc_db, "rf", "confirming", [("b1", "inventory")])
    await tcc_db.execute(
        """
        CREATE FUNCTION pg_temp_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'refused by the test'; END; $$;
        CREATE TRIGGER refuse_round_end BEFORE UPDATE ON rmsg_tcc_transaction
            FOR EACH ROW WHEN (NEW.attempts > OLD.attempts OR NEW.status <> OLD.status)
            EXECUTE FUNCTION pg_temp_refuse();
        """
    )
    try:
        async with driver(settings) as d:
            assert await d.run_once() == 1
            tx = await transaction(tcc_db, "rf")
            assert (tx["lease_owner"], tx["lease_until"]) == (None, None)
            assert (tx["status"], tx["attempts"]) == ("confirming", 0)
            await tcc_db.execute("DROP TRIGGER refuse_round_end ON rmsg_tcc_transaction")
            assert await d.run_once() == 1  # claimed again at once
    finally:
        await tcc_db.execute("DROP TRIGGER IF EXISTS refuse_round_end ON rmsg_tcc_transaction")
        await tcc_db.execute("DROP FUNCTION IF EXISTS pg_temp_refuse()")
    tx = await transaction(tcc_db, "rf")
    assert (tx["status"], tx["lease_owner"]) == ("confirmed", None)
    assert sum((await effects(tcc_db)).values()) == 1


async def test_a_driver_stopped_mid_call_releases_the_lease_and_records_no_call(
    make_settings: Callable[..., Settings],
    scripted: tuple[Scripted, str],
    tcc_db: asyncpg.Connection,
) -> None:
    """A restarted instance must not wait ``tcc.lease`` for the rounds a stop cancelled:
    their leases are released, the calls cut short recorded as nothing."""
    credit, credit_url = scripted
    credit.hold = True
    settings = configure(make_settings, {"credit": credit_url}, tcc={"lease": 30})
    await insert(tcc_db, "held", "confirming", [("b1", "credit")])
    async with driver(settings) as d:
        run = asyncio.create_task(d.run_once())
        await asyncio.wait_for(credit.holding.wait(), 10)
        assert (await transaction(tcc_db, "held"))["lease_owner"] == "driver-a"
        await d.stop(grace=0.1)
        await asyncio.wait_for(run, 10)
        tx = await transaction(tcc_db, "held")
        assert (tx["lease_owner"], tx["lease_until"], tx["attempts"]) == (None, None, 0)
        assert (await branch(tcc_db, "held", "b1"))["attempts"] == 0
        assert await events(tcc_db, "held") == []


def gauge(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


async def test_a_stalled_transaction_is_flagged_once_logged_and_counted(
    make_settings: Callable[..., Settings],
    scripted: tuple[Scripted, str],
    tcc_db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    credit, credit_url = scripted
    credit.answers = [500, 500]
    settings = configure(
        make_settings,
        {"credit": credit_url},
        tcc={"stalled_after": 60, "backoff_base": 0.05, "backoff_cap": 0.05},
    )
    await insert(tcc_db, "old", "confirming", [("b1", "credit")], age=3600)
    await insert(tcc_db, "young", "cancelling", [("b1", "credit")])
    await tcc_db.execute(
        "UPDATE rmsg_tcc_branch SET next_try_at = now() + interval '1 hour' WHERE gid = 'young'"
    )
    await tcc_db.execute(
        "UPDATE rmsg_tcc_transaction SET next_try_at = now() + interval '1 hour'"
        " WHERE gid = 'young'"
    )
    async with driver(settings) as d:
        with caplog.at_level(logging.WARNING, logger="reliable_msg.service.tcc.driver"):
            assert await d.run_once() == 1
            await wait_until(lambda: claims(d), within=5, every=0.05)
        warnings = [r for r in caplog.records if r.name == "reliable_msg.service.tcc.driver"]
        assert [(r.levelname, getattr(r, "gid", None)) for r in warnings] == [("WARNING", "old")]
        assert "old" in warnings[0].getMessage()
        old = await transaction(tcc_db, "old")
        assert old["stalled"] and old["status"] == "confirming" and old["attempts"] == 2
        assert not (await transaction(tcc_db, "young"))["stalled"]
        stalled_events = [r for r in await events(tcc_db) if r["op"] == "stalled"]
        assert [(r["gid"], r["outcome"], r["instance"]) for r in stalled_events] == [
            ("old", "ok", "driver-a")
        ]
        await d.report()
        assert gauge("rmsg_tcc_stalled") == 1
        assert gauge("rmsg_tcc_transactions", status="confirming") == 1
        assert gauge("rmsg_tcc_transactions", status="cancelling") == 1
        assert gauge("rmsg_tcc_transactions", status="confirmed") == 0
        assert (gauge("rmsg_tcc_oldest_unfinished_seconds") or 0) >= 3600
        await wait_until(lambda: claims(d), within=5, every=0.05)  # answered 200 now
        await d.report()
    old = await transaction(tcc_db, "old")
    assert (old["status"], old["stalled"]) == ("confirmed", False)
    assert gauge("rmsg_tcc_stalled") == 0
    assert gauge("rmsg_tcc_transactions", status="confirmed") == 1


async def test_the_stalled_pass_flags_at_most_scanner_batch_each_once(
    make_settings: Callable[..., Settings],
    tcc_db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Like the other passes, the stalled one is bounded by ``scanner.batch``: 5 stalled
    transactions at batch 2 take three passes, each flagged (event, WARNING) once."""
    settings = make_settings(scanner={"batch": 2}, tcc={"stalled_after": 60})
    for i in range(5):
        await insert(tcc_db, f"st-{i}", "confirming", [("b1", "inventory")], age=3600)
    await tcc_db.execute(  # not due: only the stalled pass sees them
        "UPDATE rmsg_tcc_transaction SET next_try_at = now() + interval '1 hour'"
    )
    flagged = []
    async with driver(settings) as d:
        with caplog.at_level(logging.WARNING, logger="reliable_msg.service.tcc.driver"):
            for _ in range(4):
                assert await d.run_once() == 0
                flagged.append(
                    await tcc_db.fetchval("SELECT count(*) FROM rmsg_tcc_transaction WHERE stalled")
                )
    assert flagged == [2, 4, 5, 5]
    stalled_events = [r["gid"] for r in await events(tcc_db) if r["op"] == "stalled"]
    assert sorted(stalled_events) == [f"st-{i}" for i in range(5)]
    warned = [str(getattr(r, "gid", "")) for r in caplog.records if "stalled" in r.getMessage()]
    assert sorted(warned) == [f"st-{i}" for i in range(5)]


async def test_two_drivers_share_a_thousand_due_transactions_each_branch_called_once(
    make_settings: Callable[..., Settings], sdk_url: str, tcc_db: asyncpg.Connection
) -> None:
    settings = configure(make_settings, {"inventory": sdk_url})
    gids = [f"many-{i:04d}" for i in range(1000)]
    await insert_many(tcc_db, gids, "confirming", "inventory")
    branches = await tcc_db.fetchval("SELECT count(*) FROM rmsg_tcc_branch")
    assert branches == 1500

    async def drain(d: Driver) -> None:
        while await d.run_once():
            pass

    async with driver(settings, "driver-a") as a, driver(settings, "driver-b") as b:
        await asyncio.gather(drain(a), drain(b))
    statuses = await tcc_db.fetch(
        "SELECT status, count(*) FROM rmsg_tcc_transaction GROUP BY status"
    )
    assert {r["status"]: r["count"] for r in statuses} == {"confirmed": 1000}
    calls = await tcc_db.fetch(
        "SELECT gid, branch, outcome, instance FROM rmsg_tcc_event WHERE op = 'confirm'"
    )
    per_branch = Counter((r["gid"], r["branch"]) for r in calls)
    assert len(per_branch) == 1500 and set(per_branch.values()) == {1}
    assert {r["outcome"] for r in calls} == {"ok"}
    by_instance = Counter(r["instance"] for r in calls)
    assert set(by_instance) == {"driver-a", "driver-b"}, by_instance
    attempts = await tcc_db.fetch("SELECT DISTINCT attempts FROM rmsg_tcc_branch")
    assert [r["attempts"] for r in attempts] == [1]
    done = await barrier(tcc_db)
    assert len({(g, b) for g, b, op, _ in done if op == "confirm"}) == 1500 == len(done)
    assert sum((await effects(tcc_db)).values()) == 1500


async def test_a_participant_down_for_thirty_seconds_is_confirmed_when_back(
    make_settings: Callable[..., Settings], pool: asyncpg.Pool, tcc_db: asyncpg.Connection
) -> None:
    port = free_port()
    base, cap, jitter = 0.5, 4.0, 0.2
    credit_app = sdk_app(participant(pool, "credit"))
    inventory_app = sdk_app(participant(pool, "inventory"))
    async with serving(credit_app) as credit_url:
        settings = configure(
            make_settings,
            {"inventory": f"http://127.0.0.1:{port}", "credit": credit_url},
            tcc={"backoff_base": base, "backoff_cap": cap, "jitter": jitter},
        )
        async with driver(settings) as d:
            stop = asyncio.Event()

            async def passes() -> None:  # the scheduler's job, every 0.1 s
                while not stop.is_set():
                    await d.run_once(wait=False)
                    await asyncio.sleep(0.1)

            async def confirmed(gid: str) -> bool:
                return await status_of(tcc_db, gid) == "confirmed"

            loop = asyncio.create_task(passes())
            try:
                async with serving(inventory_app, port):  # up: a first order goes through
                    await insert(tcc_db, "g0", "confirming", [("inv", "inventory")])
                    await wait_until(lambda: confirmed("g0"), within=5)
                # inventory down from here, for 30 s: the Confirm of g8 comes meanwhile
                await insert(tcc_db, "g8", "confirming", [("inv", "inventory"), ("cr", "credit")])
                await asyncio.sleep(30)
                assert (await transaction(tcc_db, "g8"))["status"] == "confirming"
                async with serving(inventory_app, port):  # back, on the same port
                    await wait_until(lambda: confirmed("g8"), within=cap * (1 + jitter) + 5)
            finally:
                stop.set()
                await loop
    inv = await branch(tcc_db, "g8", "inv")
    assert inv["status"] == "confirmed" and inv["last_status"] == 200
    assert inv["last_error"] == "connection refused"
    calls = [r for r in await events(tcc_db, "g8") if r["branch"] == "inv"]
    failed = calls[:-1]
    assert inv["attempts"] == len(calls) >= 8  # 0.5 + 1 + 2 + 4 * 5 s within 30 s
    assert all(
        (r["outcome"], r["http_status"], r["error"]) == ("failed", None, "connection refused")
        for r in failed
    )
    assert calls[-1]["outcome"] == "ok"
    gaps = [(b["at"] - a["at"]).total_seconds() for a, b in itertools.pairwise(calls)]
    for n, gap in enumerate(gaps, start=1):
        assert gap >= min(cap, base * 2 ** (n - 1)) * (1 - jitter), (n, gaps)
    assert max(gaps) < cap * (1 + jitter) + 5, gaps  # capped: never hours away
    cr = await branch(tcc_db, "g8", "cr")
    assert (cr["status"], cr["attempts"]) == ("confirmed", 1)
    tx = await transaction(tcc_db, "g8")
    assert tx["attempts"] == inv["attempts"]


@pytest.fixture
def settings(make_settings: Callable[..., Settings], sdk_url: str) -> Settings:
    """The service's settings (for ``runtime``) with the SDK participants declared."""
    return configure(make_settings, {"inventory": sdk_url, "credit": sdk_url})


async def test_a_commit_through_the_api_kicks_the_runtime_s_driver(
    runtime: Runtime, client: httpx.AsyncClient, tcc_db: asyncpg.Connection
) -> None:
    """Begin, register, the Trys (by the initiator, to the try URLs the answer gave), then
    commit: the runtime's driver confirms every branch at once, with no pass run."""
    producer = {"Authorization": f"Bearer {PRODUCER}"}
    r = await client.post(TX, json={"gid": "api-1", "timeout": 30}, headers=producer)
    assert r.status_code == 201, r.text
    wanted = [{"branch": b, "participant": p, "payload": {"qty": 1}} for b, p in BRANCHES]
    r = await client.post(f"{TX}/api-1/branches", json={"branches": wanted}, headers=producer)
    assert r.status_code == 200, r.text
    async with httpx.AsyncClient() as http:
        for answer in r.json()["branches"]:
            body = {"gid": "api-1", "branch": answer["branch"], "op": "try", "payload": {}}
            headers = {
                GID_HEADER: "api-1",
                BRANCH_HEADER: answer["branch"],
                OP_HEADER: "try",
                "Authorization": f"Bearer {answer['proof']}",
            }
            tried = await http.post(answer["try_url"], json=body, headers=headers)
            assert tried.status_code == 200, tried.text
    r = await client.post(f"{TX}/api-1/commit", headers=producer)
    assert r.status_code == 200 and r.json()["status"] in ("confirming", "confirmed"), r.text
    await wait_until(lambda: status_is(tcc_db, "api-1", "confirmed"), within=10)
    assert await effects(tcc_db) == {
        (p, "api-1", b, op): 1 for b, p in BRANCHES for op in ("try", "confirm")
    }
    calls = [r for r in await events(tcc_db, "api-1") if r["op"] == "confirm"]
    assert sorted((r["branch"], r["outcome"]) for r in calls) == [("b1", "ok"), ("b2", "ok")]
    assert {r["instance"] for r in calls} == {runtime.tcc_driver.instance}
