"""Crash injection for the TCC coordinator: a ``reliable-msg serve`` instance SIGKILLed
while it drives a committed transaction (before any Confirm answered, after one, with
thirty in flight) or a cancelled one, frozen past its lease, or its PostgreSQL backends
terminated while it records an answer, loses nothing: another instance, or the restarted
one, finishes every branch, and each participant applies each branch once.

The coordinator runs as real processes (tests/helpers/tcc_served.py); the participants
are real HTTP servers built with the participant SDK (tests/helpers/tcc_parties.py), a
fault proxy in front of those
whose Confirm must hang while the instance dies. "Once" is read from the participants'
business rows, their handler runs and their barrier rows; what the coordinator did from
its rows and its event log. The initiator is the test, over the HTTP API.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import asyncpg
import httpx
import pytest

from reliable_msg.harness.proxy import FaultProxy
from reliable_msg.sdk.tcc import Op
from reliable_msg.service.settings import Settings
from tests.helpers import tables
from tests.helpers.tcc_parties import START, Party, call_try, run_trys, serving_party
from tests.helpers.tcc_served import (
    FINISH_WITHIN,
    QTY,
    begin_and_register,
    begin_and_try,
    blocked_recordings,
    branches,
    called_since,
    calls,
    commit,
    coordinator,
    decide,
    events,
    finished,
    instance_name,
    moves,
    paused,
    proxy_before,
    start,
    transaction,
    via,
)
from tests.helpers.waiting import wait_until


@pytest.fixture
async def tcc_db(db: asyncpg.Connection) -> asyncpg.Connection:
    """The test database with no TCC transaction (their branches and events go too)."""
    await tables.empty(db, "rmsg_tcc_transaction")
    return db


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    """Everything a test starts (participants, proxies, instances), stopped in reverse
    order whatever happens."""
    async with AsyncExitStack() as stack:
        yield stack


async def assert_applied_once(parties: list[Party], gid: str, *, of: int = 1) -> None:
    """Each party ran its branch's Try and Confirm once (business rows, handler runs,
    barrier rows), and every Confirm it was called for beyond the first was answered
    as a duplicate by the barrier; ``of`` transactions were confirmed in all."""
    for party in parties:
        b = party.name
        assert await party.account() == (START - QTY * of, 0, QTY * of), b
        assert await party.runs(gid) == [(b, "confirm"), (b, "try")], b
        assert await party.barrier(gid) == [(b, "confirm", "confirm"), (b, "try", "try")], b
        confirms = party.outcomes(Op.CONFIRM, gid)
        assert confirms.count("done") == 1, (b, confirms)
        assert set(confirms) <= {"done", "duplicate"}, (b, confirms)


@pytest.mark.parametrize("kills", [1, 3])
async def test_a_coordinator_killed_before_any_confirm_is_finished_by_its_restart(
    make_settings: Callable[..., Settings],
    tcc_db: asyncpg.Connection,
    database_url: str,
    stack: AsyncExitStack,
    tmp_path: Path,
    kills: int,
) -> None:
    """Killed ``kills`` times in a row, each restart killed in its turn while its own
    Confirms hang: every killed instance's calls arrive late, together, when the
    proxies resume, with the last restart's."""
    gid = f"crash-before-confirm-{kills}"
    parties = [
        await stack.enter_async_context(serving_party(database_url, name))
        for name in ("inventory", "credit")
    ]
    proxies = [await proxy_before(stack, p) for p in parties]
    config = coordinator(
        make_settings,
        tmp_path,
        stack,
        {p.name: via(proxy, p) for p, proxy in zip(parties, proxies, strict=True)},
    )
    first = instance = await start(stack, config, tmp_path, "first")
    await begin_and_try(first, gid, parties)

    # The commit is taken; its Confirms hang in the proxies, unanswered, and so do
    # those of each restart once the lease of the killed one ended.
    for proxy in proxies:
        proxy.stall()
    for n in range(kills):
        accepted = [proxy.accepted for proxy in proxies]
        if n == 0:
            await commit(first, gid)
        else:
            instance = await start(stack, config, tmp_path, f"restart-{n}")
        await wait_until(called_since(proxies, accepted), within=30)
        instance.kill()
    assert [await p.runs(gid) for p in parties] == [[(p.name, "try")] for p in parties]
    assert {b["status"] for b in (await branches(tcc_db, gid)).values()} == {"registered"}

    for proxy in proxies:
        proxy.resume()
    last = await start(stack, config, tmp_path, "last")
    await finished(tcc_db, gid)

    await assert_applied_once(parties, gid)
    log = await events(tcc_db, gid)
    one, two = instance_name(first), instance_name(last)
    assert moves(log) == [("begin", one), ("commit", one), ("confirmed", two)]
    rows = await branches(tcc_db, gid)
    for party in parties:
        # The killed instances' calls got no answer before they died: none was recorded,
        # and the last one's first call of each branch was answered 200.
        assert calls(log, party.name) == [("ok", 200, two)], party.name
        row = rows[party.name]
        assert (row["status"], row["attempts"], row["last_status"]) == ("confirmed", 1, 200)
    tx = await transaction(tcc_db, gid)
    assert (tx["attempts"], tx["lease_owner"], tx["stalled"]) == (1, None, False)


#: Transactions whose Confirms are in flight when their instance dies.
IN_FLIGHT = 30


async def quick_and_slow(
    make_settings: Callable[..., Settings],
    database_url: str,
    stack: AsyncExitStack,
    tmp_path: Path,
) -> tuple[Party, Party, FaultProxy, Path]:
    """Inventory called directly and credit behind a fault proxy, and the coordinator's
    configuration naming both."""
    quick = await stack.enter_async_context(serving_party(database_url, "inventory"))
    slow = await stack.enter_async_context(serving_party(database_url, "credit"))
    proxy = await proxy_before(stack, slow)
    config = coordinator(
        make_settings, tmp_path, stack, {quick.name: quick.config(), slow.name: via(proxy, slow)}
    )
    return quick, slow, proxy, config


async def test_a_coordinator_killed_with_many_commits_in_flight_loses_none(
    make_settings: Callable[..., Settings],
    tcc_db: asyncpg.Connection,
    database_url: str,
    stack: AsyncExitStack,
    tmp_path: Path,
) -> None:
    gids = [f"in-flight-{n}" for n in range(IN_FLIGHT)]
    parties = [
        await stack.enter_async_context(serving_party(database_url, name))
        for name in ("inventory", "credit")
    ]
    proxies = [await proxy_before(stack, p) for p in parties]
    config = coordinator(
        make_settings,
        tmp_path,
        stack,
        {p.name: via(proxy, p) for p, proxy in zip(parties, proxies, strict=True)},
    )
    first, second = [await start(stack, config, tmp_path, name) for name in ("a", "b")]
    for gid in gids:
        await run_trys(gid, await begin_and_register(first, gid, parties), {"qty": QTY})

    # Every Confirm of every transaction hangs in the proxies, most of them (or all)
    # called by the instance that took the commits: it dies.
    accepted = [proxy.accepted for proxy in proxies]
    for proxy in proxies:
        proxy.stall()
    await asyncio.gather(*(commit(first, gid) for gid in gids))
    await wait_until(called_since(proxies, accepted, IN_FLIGHT), within=30)
    first.kill()
    for proxy in proxies:
        proxy.resume()

    async def all_confirmed() -> bool:
        n = await tcc_db.fetchval(
            "SELECT count(*) FROM rmsg_tcc_transaction WHERE status = 'confirmed'"
        )
        return bool(n == IN_FLIGHT)

    await wait_until(all_confirmed, within=FINISH_WITHIN, every=0.2)
    for gid in gids:
        await assert_applied_once(parties, gid, of=IN_FLIGHT)
        log = await events(tcc_db, gid)
        assert [op for op, _ in moves(log)] == ["begin", "commit", "confirmed"], gid
        for party in parties:
            [(outcome, status, _)] = calls(log, party.name)
            assert (outcome, status) == ("ok", 200), (gid, party.name)
    assert second.exit_code() is None, second.log_tail()


async def test_a_coordinator_killed_after_one_confirm_is_finished_by_another_instance(
    make_settings: Callable[..., Settings],
    tcc_db: asyncpg.Connection,
    database_url: str,
    stack: AsyncExitStack,
    tmp_path: Path,
) -> None:
    gid = "crash-after-one-confirm"
    quick, slow, proxy, config = await quick_and_slow(make_settings, database_url, stack, tmp_path)
    instances = [await start(stack, config, tmp_path, name) for name in ("a", "b")]
    await begin_and_try(instances[0], gid, [quick, slow])

    accepted = proxy.accepted
    proxy.stall()
    await commit(instances[0], gid)

    async def one_confirmed() -> bool:
        return proxy.accepted > accepted and await quick.has_barrier(gid, quick.name, Op.CONFIRM)

    await wait_until(one_confirmed, within=30)
    # The instance driving it is the one holding its lease: that one dies.
    owner = (await transaction(tcc_db, gid))["lease_owner"]
    [driver] = [i for i in instances if instance_name(i) == owner]
    [survivor] = [i for i in instances if i is not driver]
    driver.kill()
    assert await slow.runs(gid) == [(slow.name, "try")]

    proxy.resume()
    await finished(tcc_db, gid)

    await assert_applied_once([quick, slow], gid)
    log = await events(tcc_db, gid)
    survived = instance_name(survivor)
    assert moves(log)[-1] == ("confirmed", survived)
    # The slow branch's Confirm was recorded by the survivor alone; the quick one's by
    # whichever instance saw its answer (the killed one, unless it died first).
    assert calls(log, slow.name) == [("ok", 200, survived)]
    [(outcome, status, _)] = calls(log, quick.name)
    assert (outcome, status) == ("ok", 200)
    for row in (await branches(tcc_db, gid)).values():
        assert (row["status"], row["attempts"], row["last_status"]) == ("confirmed", 1, 200)


async def test_a_coordinator_paused_past_its_lease_changes_nothing_when_it_wakes(
    make_settings: Callable[..., Settings],
    tcc_db: asyncpg.Connection,
    database_url: str,
    stack: AsyncExitStack,
    tmp_path: Path,
) -> None:
    """Not dead but frozen (SIGSTOP: a stop-the-world pause, a VM migrated) while its
    Confirm is in flight: the other instance takes the transaction when the lease ends
    and confirms it; the frozen one, woken, gets its old call's end and moves nothing
    back and nothing twice."""
    gid = "paused-past-lease"
    quick, slow, proxy, config = await quick_and_slow(make_settings, database_url, stack, tmp_path)
    instances = [await start(stack, config, tmp_path, name) for name in ("a", "b")]
    await begin_and_try(instances[0], gid, [quick, slow])

    accepted = proxy.accepted
    proxy.stall()
    await commit(instances[0], gid)

    async def one_confirmed() -> bool:
        return proxy.accepted > accepted and await quick.has_barrier(gid, quick.name, Op.CONFIRM)

    await wait_until(one_confirmed, within=30)
    owner = (await transaction(tcc_db, gid))["lease_owner"]
    [frozen] = [i for i in instances if instance_name(i) == owner]
    [other] = [i for i in instances if i is not frozen]
    with paused(frozen):
        # Its call goes through now; the answer waits in its socket, unread.
        proxy.resume()
        await finished(tcc_db, gid)
        confirmed_at = (await transaction(tcc_db, gid))["finished_at"]

    # Woken, it reads its call's end (an answer, or its timeout, long past) and records it.
    async def recorded() -> bool:
        return any(i == owner for _, _, i in calls(await events(tcc_db, gid), slow.name))

    await wait_until(recorded, within=30)
    await finished(tcc_db, gid)
    tx = await transaction(tcc_db, gid)
    assert (tx["status"], tx["finished_at"], tx["lease_owner"]) == ("confirmed", confirmed_at, None)
    await assert_applied_once([quick, slow], gid)
    # The slow branch's first call was the frozen instance's (answered done), the other
    # instance's a duplicate; only the other's moved the branch.
    assert slow.outcomes(Op.CONFIRM, gid) == ["done", "duplicate"]
    log = await events(tcc_db, gid)
    assert [m for m in moves(log) if m[0] == "confirmed"] == [("confirmed", instance_name(other))]
    row = (await branches(tcc_db, gid))[slow.name]
    assert (row["status"], row["attempts"], row["last_status"]) == ("confirmed", 1, 200)
    assert frozen.exit_code() is None, frozen.log_tail()


async def test_a_coordinator_killed_mid_cancel_is_finished_by_another_instance(
    make_settings: Callable[..., Settings],
    tcc_db: asyncpg.Connection,
    database_url: str,
    stack: AsyncExitStack,
    tmp_path: Path,
) -> None:
    """The initiator cancels after one Try ran and before the other did; the instance
    driving the Cancels dies while the untried branch's Cancel hangs."""
    gid = "crash-mid-cancel"
    tried = await stack.enter_async_context(serving_party(database_url, "inventory"))
    untried = await stack.enter_async_context(serving_party(database_url, "credit"))
    proxy = await proxy_before(stack, untried)
    config = coordinator(
        make_settings,
        tmp_path,
        stack,
        {tried.name: tried.config(), untried.name: via(proxy, untried)},
    )
    instances = [await start(stack, config, tmp_path, name) for name in ("a", "b")]
    registered = await begin_and_register(instances[0], gid, [tried, untried])
    [try_tried, try_untried] = registered
    await run_trys(gid, [try_tried], {"qty": QTY})

    accepted = proxy.accepted
    proxy.stall()
    await decide(instances[0], gid, "cancel")

    async def one_cancelled() -> bool:
        return proxy.accepted > accepted and await tried.has_barrier(gid, tried.name, Op.CANCEL)

    await wait_until(one_cancelled, within=30)
    owner = (await transaction(tcc_db, gid))["lease_owner"]
    [driver] = [i for i in instances if instance_name(i) == owner]
    [survivor] = [i for i in instances if i is not driver]
    driver.kill()
    proxy.resume()
    await finished(tcc_db, gid, "cancelled")

    # The tried branch: frozen, then given back, once each.
    assert await tried.account() == (START, 0, 0)
    assert await tried.runs(gid) == [(tried.name, "cancel"), (tried.name, "try")]
    assert await tried.barrier(gid) == [
        (tried.name, "cancel", "cancel"),
        (tried.name, "try", "try"),
    ]
    # The untried one: an empty rollback, recorded once (the killed instance's call,
    # delivered late, or the survivor's), no handler run; and its Try, arriving now,
    # is refused with no effect.
    assert await untried.runs(gid) == []
    assert await untried.barrier(gid) == [
        (untried.name, "cancel", "cancel"),
        (untried.name, "try", "cancel"),
    ]
    cancels = untried.outcomes(Op.CANCEL, gid)
    assert cancels.count("empty_rollback") == 1 and set(cancels) <= {
        "empty_rollback",
        "duplicate",
    }, cancels
    async with httpx.AsyncClient() as http:
        late = await call_try(http, gid, try_untried, {"qty": QTY})
    assert late.status_code == 409, late.text
    assert late.json()["error"]["code"] == "cancelled_before_try"
    assert await untried.account() == (START, 0, 0)
    assert await untried.runs(gid) == []

    log = await events(tcc_db, gid)
    survived = instance_name(survivor)
    assert moves(log)[-1] == ("cancelled", survived)
    assert calls(log, untried.name, Op.CANCEL) == [("ok", 200, survived)]
    for row in (await branches(tcc_db, gid)).values():
        assert (row["status"], row["attempts"], row["last_status"]) == ("cancelled", 1, 200)


async def test_the_coordinators_backends_terminated_while_it_records_a_confirm(
    make_settings: Callable[..., Settings],
    tcc_db: asyncpg.Connection,
    database_url: str,
    stack: AsyncExitStack,
    tmp_path: Path,
) -> None:
    gid = "backends-terminated"
    quick, slow, proxy, config = await quick_and_slow(make_settings, database_url, stack, tmp_path)
    instance = await start(stack, config, tmp_path, "only")
    await begin_and_try(instance, gid, [quick, slow])

    accepted = proxy.accepted
    proxy.stall()
    await commit(instance, gid)

    async def one_recorded() -> bool:
        rows = await branches(tcc_db, gid)
        return proxy.accepted > accepted and rows[quick.name]["status"] == "confirmed"

    await wait_until(one_recorded, within=30)
    # The slow participant confirms, and the coordinator's record of its answer waits
    # in PostgreSQL behind a lock this test holds on the branch's row...
    locker = await asyncpg.connect(database_url)
    stack.push_async_callback(locker.close)
    async with locker.transaction():
        await locker.execute(
            "SELECT 1 FROM rmsg_tcc_branch WHERE gid = $1 AND branch = $2 FOR UPDATE",
            gid,
            slow.name,
        )
        proxy.resume()
        await wait_until(lambda: slow.outcomes(Op.CONFIRM, gid) == ["done"], within=30)

        async def blocked() -> bool:
            return await blocked_recordings(database_url) > 0

        await wait_until(blocked, within=30)
        # ... when every other backend of the database is terminated: the instance's
        # (the waiting one with them) and the participants'.
        terminated = await locker.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        assert terminated >= 2

        async def gone() -> bool:
            return await blocked_recordings(database_url) == 0

        await wait_until(gone, within=30)
    # The test's own connection was terminated with the others: a new one.
    tcc_db = await asyncpg.connect(database_url)
    stack.push_async_callback(tcc_db.close)
    await finished(tcc_db, gid)

    await assert_applied_once([quick, slow], gid)
    # The answer the coordinator could not record is asked for again: the barrier
    # answers it as a duplicate, and only that second call is in the log and the rows.
    assert slow.outcomes(Op.CONFIRM, gid) == ["done", "duplicate"]
    log = await events(tcc_db, gid)
    name = instance_name(instance)
    assert moves(log) == [("begin", name), ("commit", name), ("confirmed", name)]
    rows = await branches(tcc_db, gid)
    for party in (quick, slow):
        assert calls(log, party.name) == [("ok", 200, name)], party.name
        assert (rows[party.name]["status"], rows[party.name]["attempts"]) == ("confirmed", 1)
    assert instance.exit_code() is None, instance.log_tail()
