"""The producer SDK's confirm batching, over a real HTTP server, PostgreSQL and RabbitMQ:
the confirms of transactions committing together go out as one ``POST
/v1/batch/confirm`` (counted at an HTTP proxy in front of the service), and each
transaction is still told its own outcome: a dead message fails only its transaction,
an unreachable service leaves every message to check-back, a lost answer retried
confirms nothing twice, a caller that goes away cancels nobody else's confirm."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aiohttp
import asyncpg
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from reliable_msg.errors import Conflict, Unauthorized
from reliable_msg.harness.ports import free_port
from reliable_msg.harness.proxy import FaultProxy
from reliable_msg.sdk.client import RetryPolicy
from reliable_msg.sdk.confirms import ConfirmBatching
from reliable_msg.sdk.producer import Producer, Sent
from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from tests.conftest import PRODUCER
from tests.helpers.waiting import wait_until
from tests.test_producer_batch import check_back_until, delivered_once, statuses
from tests.test_refusals import break_topology, repair_topology

FAST = RetryPolicy(attempts=3, initial=0.05, max_wait=0.2, deadline=2.0)
#: Transactions at once: fewer than the test pool's 10 connections.
N = 8
#: Long enough that transactions released together commit within it on a loaded machine;
#: the assertions count calls, never time.
WIDE = ConfirmBatching(window=0.5)
#: Far over RabbitMQ's frame_max (128 KiB by default): a message that can never be published.
HUGE = "h" * 200_000


@dataclass
class Call:
    path: str
    ids: list[str]
    status: int


@dataclass
class CountingProxy:
    """An HTTP proxy in front of the service that records each confirm call (its path
    and the ids it names) and can lose the next batch confirm's answer (a 502 after the
    service answered, as a load balancer whose upstream timed out would)."""

    upstream: str
    calls: list[Call] = field(default_factory=list)
    lose_next_batch_answer: bool = False
    #: Awaited once, after the first batch confirm is answered, before passing it on.
    after_first_batch: Callable[[], Awaitable[None]] | None = None
    #: Rewrites every batch confirm's answer (the ids asked, the service's answer): a
    #: buggy or hostile service.
    doctor: Callable[[list[str], dict[str, Any]], dict[str, Any]] | None = None
    #: Answers every batch confirm with this (status, error code) instead of passing it on.
    refuse_batches: tuple[int, str] | None = None
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def confirms(self) -> list[Call]:
        return [c for c in self.calls if c.path.endswith("/confirm")]

    def batches(self) -> list[Call]:
        return [c for c in self.confirms() if c.path == "/v1/batch/confirm"]

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.path == "/v1/batch/confirm" and self.refuse_batches is not None:
            status, code = self.refuse_batches
            self.calls.append(Call(request.path, json.loads(body)["ids"], status))
            error = {"error": {"code": code, "message": f"refused by the proxy: {code}"}}
            headers = {"Retry-After": "0"} if status == 429 else {}
            return web.json_response(error, status=status, headers=headers)
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, data=body, headers=headers
        ) as answer:
            raw, status = await answer.read(), answer.status
        if request.path.endswith("/confirm"):
            ids = json.loads(body)["ids"] if body else [request.path.split("/")[3]]
            if request.path == "/v1/batch/confirm" and self.lose_next_batch_answer:
                self.lose_next_batch_answer = False
                self.calls.append(Call(request.path, ids, 502))
                return web.Response(status=502, text="bad gateway")
            self.calls.append(Call(request.path, ids, status))
            if request.path == "/v1/batch/confirm" and self.doctor is not None and status == 200:
                raw = json.dumps(self.doctor(ids, json.loads(raw))).encode()
            if request.path == "/v1/batch/confirm" and self.after_first_batch is not None:
                hook, self.after_first_batch = self.after_first_batch, None
                await hook()
        return web.Response(body=raw, status=status, content_type="application/json")

    async def __aenter__(self) -> CountingProxy:
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._runner.cleanup()
        await self._session.close()


_FORWARDED = {"authorization", "content-type"}


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    url = f"http://127.0.0.1:{free_port()}/rmsg/check-back"
    return make_settings(producers={"order": {"check_url": url, "token": PRODUCER}})


@pytest.fixture
async def counting(service_url: str) -> AsyncIterator[CountingProxy]:
    async with CountingProxy(service_url) as proxy:
        yield proxy


def sent_count() -> float:
    """Messages this process's service moved to ``sent`` so far."""
    return REGISTRY.get_sample_value("rmsg_transitions_total", {"status": "sent"}) or 0.0


async def together(
    producer: Producer,
    pool: asyncpg.Pool,
    ids: list[str],
    before_commit: Callable[[str, int], Awaitable[None]] | None = None,
) -> list[Sent | BaseException]:
    """One transaction per id, all released at once to commit; each one's outcome."""
    barrier = asyncio.Barrier(len(ids))

    async def one(id: str) -> Sent:
        async with pool.acquire() as conn:
            async with producer.transaction(conn, "order.paid", {"id": id}, id=id) as sent:
                await conn.execute("INSERT INTO sdk_orders (id) VALUES ($1)", id)
                turn = await barrier.wait()
                if before_commit is not None:
                    await before_commit(id, turn)
        return sent

    return await asyncio.gather(*(one(id) for id in ids), return_exceptions=True)


async def test_concurrent_confirms_share_batch_calls_and_each_message_is_sent_once(
    service_url: str,
    settings: Settings,
    counting: CountingProxy,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
) -> None:
    ids = [f"cb-{n}" for n in range(N)]
    async with Producer(counting.url, PRODUCER, retry=FAST, confirm_batching=WIDE) as producer:
        outcomes = await together(producer, pool, ids)
    assert all(isinstance(o, Sent) and o.confirmed for o in outcomes), outcomes
    confirms = counting.confirms()
    assert len(confirms) < N, confirms
    assert any(len(c.ids) > 1 for c in counting.batches()), confirms
    assert sorted(i for c in confirms for i in c.ids) == sorted(ids)
    assert await statuses(sdk_db, ids) == dict.fromkeys(ids, "sent")
    await delivered_once(service_url, settings, pool, sdk_db, ids)


async def test_a_lone_confirm_takes_the_single_route(
    counting: CountingProxy, pool: asyncpg.Pool, sdk_db: asyncpg.Connection
) -> None:
    async with Producer(counting.url, PRODUCER, retry=FAST, confirm_batching=WIDE) as producer:
        [sent] = await together(producer, pool, ["alone-1"])
    assert isinstance(sent, Sent) and sent.confirmed
    assert [(c.path, c.ids) for c in counting.confirms()] == [
        ("/v1/messages/alone-1/confirm", ["alone-1"])
    ]


async def test_off_switch_sends_one_confirm_call_per_transaction(
    counting: CountingProxy, pool: asyncpg.Pool, sdk_db: asyncpg.Connection
) -> None:
    ids = [f"off-{n}" for n in range(N)]
    off = ConfirmBatching(enabled=False)
    async with Producer(counting.url, PRODUCER, retry=FAST, confirm_batching=off) as producer:
        outcomes = await together(producer, pool, ids)
    assert all(isinstance(o, Sent) and o.confirmed for o in outcomes), outcomes
    assert not counting.batches()
    assert sorted(c.path for c in counting.confirms()) == sorted(
        f"/v1/messages/{id}/confirm" for id in ids
    )


async def test_a_dead_message_fails_only_its_own_transaction(
    counting: CountingProxy, pool: asyncpg.Pool, sdk_db: asyncpg.Connection
) -> None:
    """One message of the batch can never be published (its stored header outgrew
    frame_max): its transaction gets the Conflict a lone confirm gets; the others are
    confirmed by the same call."""
    ids = [f"dd-{n}" for n in range(N)]
    victim = ids[3]

    async def spoil(id: str, _: int) -> None:
        if id == victim:
            await sdk_db.execute(
                "UPDATE rmsg_message SET headers = $1::jsonb WHERE id = $2",
                json.dumps({"b": HUGE}),
                id,
            )

    async with Producer(counting.url, PRODUCER, retry=FAST, confirm_batching=WIDE) as producer:
        outcomes = dict(zip(ids, await together(producer, pool, ids, spoil), strict=True))
    failed = outcomes.pop(victim)
    assert isinstance(failed, Conflict) and failed.code == "dead", failed
    assert victim in failed.message and "frame_max" in failed.message
    assert all(isinstance(o, Sent) and o.confirmed for o in outcomes.values()), outcomes
    [shared] = [c for c in counting.batches() if victim in c.ids]
    assert len(shared.ids) > 1
    want = {**dict.fromkeys(ids, "sent"), victim: "dead"}
    assert await statuses(sdk_db, ids) == want
    # Committed locally all the same: the marker is there, as with a lone confirm.
    markers = await sdk_db.fetchval("SELECT count(*) FROM rmsg_producer_marker")
    assert markers == N


async def test_service_down_in_the_window_tells_each_and_check_back_finishes(
    runtime: Runtime,
    service_url: str,
    settings: Settings,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
) -> None:
    ids = [f"down-{n}" for n in range(N)]
    port = int(service_url.rsplit(":", 1)[1])
    async with FaultProxy("127.0.0.1", port) as proxy:
        went_down = asyncio.Event()

        async def cut(_: str, turn: int) -> None:
            if turn == 0:
                await proxy.down()
                went_down.set()
            await went_down.wait()

        async with Producer(
            proxy.url("http"), PRODUCER, retry=FAST, confirm_batching=WIDE
        ) as producer:
            outcomes = await together(producer, pool, ids, cut)
        await proxy.up()
    assert all(isinstance(o, Sent) and not o.confirmed for o in outcomes), outcomes
    assert await statuses(sdk_db, ids) == dict.fromkeys(ids, "pending")
    await check_back_until(runtime, pool, sdk_db, dict.fromkeys(ids, "sent"))
    await delivered_once(service_url, settings, pool, sdk_db, ids)


async def test_a_batch_whose_answer_is_lost_is_retried_without_sending_twice(
    service_url: str,
    settings: Settings,
    counting: CountingProxy,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
) -> None:
    """The service confirmed the batch but its answer never arrived: the client retries
    the same batch, the service answers each message as sent, and nothing is published
    twice (the consumer handles each message once)."""
    ids = [f"lost-{n}" for n in range(N)]
    counting.lose_next_batch_answer = True
    sent_before = sent_count()
    async with Producer(counting.url, PRODUCER, retry=FAST, confirm_batching=WIDE) as producer:
        outcomes = await together(producer, pool, ids)
    assert all(isinstance(o, Sent) and o.confirmed for o in outcomes), outcomes
    lost = [c for c in counting.batches() if c.status == 502]
    assert len(lost) == 1
    retried = [c for c in counting.batches() if c.ids == lost[0].ids and c.status == 200]
    assert len(retried) == 1
    # Each message moved to sent (and was published) once: the retry found them sent.
    assert sent_count() - sent_before == N
    await delivered_once(service_url, settings, pool, sdk_db, ids)


async def test_a_caller_cancelled_while_waiting_does_not_cancel_the_others(
    counting: CountingProxy, pool: asyncpg.Pool, sdk_db: asyncpg.Connection
) -> None:
    """A transaction's task is cancelled after its commit, while its confirm waits in the
    window: the batch still goes out for everyone, its own message included."""
    ids = [f"cx-{n}" for n in range(N)]
    victim = ids[0]
    slow = ConfirmBatching(window=2.0)
    async with Producer(counting.url, PRODUCER, retry=FAST, confirm_batching=slow) as producer:
        task = asyncio.ensure_future(together(producer, pool, [victim]))
        others = asyncio.ensure_future(together(producer, pool, ids[1:]))

        async def victim_committed() -> bool:
            return bool(
                await sdk_db.fetchval(
                    "SELECT count(*) FROM rmsg_producer_marker WHERE message_id = $1", victim
                )
            )

        await wait_until(victim_committed, within=10, every=0.02)
        assert not counting.confirms()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        outcomes = await others
    assert all(isinstance(o, Sent) and o.confirmed for o in outcomes), outcomes
    assert sorted(i for c in counting.confirms() for i in c.ids) == sorted(ids)
    assert any(victim in c.ids and len(c.ids) > 1 for c in counting.batches())
    assert await statuses(sdk_db, ids) == dict.fromkeys(ids, "sent")


async def test_an_item_not_publishable_yet_is_retried_as_a_lone_confirm_would_be(
    settings: Settings,
    counting: CountingProxy,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    """No queue takes the messages when the shared batch goes out (each item is
    ``unroutable``); a lone confirm would have been retried by the client, so each
    message is, on the single route: the topology is back by then and all are sent."""
    ids = [f"ur-{n}" for n in range(N)]

    async def repair() -> None:
        await repair_topology(amqp, settings)

    counting.after_first_batch = repair
    await break_topology(amqp, settings)
    try:
        async with Producer(counting.url, PRODUCER, retry=FAST, confirm_batching=WIDE) as producer:
            outcomes = await together(producer, pool, ids)
    finally:
        await repair_topology(amqp, settings)
    assert all(isinstance(o, Sent) and o.confirmed for o in outcomes), outcomes
    first = counting.batches()[0]
    assert len(first.ids) > 1
    singles = [c.ids[0] for c in counting.confirms() if c.path != "/v1/batch/confirm"]
    assert sorted(set(singles)) == sorted(first.ids)
    assert await statuses(sdk_db, ids) == dict.fromkeys(ids, "sent")


def _rotate(_: list[str], answer: dict[str, Any]) -> dict[str, Any]:
    results = answer["results"]
    return {"results": results[1:] + results[:1]}


def _alien(ids: list[str], answer: dict[str, Any]) -> dict[str, Any]:
    """The victim's result replaced by an "ok" for an id nobody asked about."""
    alien = {"id": "alien", "ok": True, "status": "sent", "created": None, "error": None}
    return {"results": [alien if r["id"] == VICTIM else r for r in answer["results"]]}


def _dropped(_: list[str], answer: dict[str, Any]) -> dict[str, Any]:
    return {"results": [r for r in answer["results"] if r["id"] != VICTIM]}


def _no_error(_: list[str], answer: dict[str, Any]) -> dict[str, Any]:
    """The victim's item failed, but says nothing of why."""
    results = [{**r, "error": None} if r["id"] == VICTIM else r for r in answer["results"]]
    return {"results": results}


VICTIM = "bad-3"


@pytest.mark.parametrize("doctor", [_rotate, _alien, _dropped, _no_error])
async def test_a_batch_answer_out_of_order_or_missing_an_id_is_never_misassigned(
    doctor: Callable[[list[str], dict[str, Any]], dict[str, Any]],
    counting: CountingProxy,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
) -> None:
    """A buggy or hostile service answers a shared batch in another order, with an id
    nobody asked about, without one of the ids, or with a failed item that gives no
    error: each transaction is still told its own message's outcome (the dead one's
    Conflict goes to it and to no other), and none crashes."""
    ids = [f"bad-{n}" for n in range(N)]
    counting.doctor = doctor

    async def spoil(id: str, _: int) -> None:
        if id == VICTIM:
            await sdk_db.execute(
                "UPDATE rmsg_message SET headers = $1::jsonb WHERE id = $2",
                json.dumps({"b": HUGE}),
                id,
            )

    async with Producer(counting.url, PRODUCER, retry=FAST, confirm_batching=WIDE) as producer:
        outcomes = dict(zip(ids, await together(producer, pool, ids, spoil), strict=True))
    [shared] = [c for c in counting.batches() if VICTIM in c.ids]
    assert len(shared.ids) > 1
    failed = outcomes.pop(VICTIM)
    assert isinstance(failed, Conflict) and failed.code == "dead", failed
    assert all(isinstance(o, Sent) and o.confirmed for o in outcomes.values()), outcomes
    want = {**dict.fromkeys(ids, "sent"), VICTIM: "dead"}
    assert await statuses(sdk_db, ids) == want


async def test_a_rate_limited_batch_leaves_its_messages_to_check_back_without_reruns(
    runtime: Runtime,
    counting: CountingProxy,
    pool: asyncpg.Pool,
    sdk_db: asyncpg.Connection,
) -> None:
    """A shared batch still rate limited after the client's retries: the limit is the
    credential's, so no transaction's confirm is sent again on its own (N more requests
    into a limit already spent); each is told "not confirmed", as a lone confirm still
    limited after its retries is, and check-back finishes the messages."""
    ids = [f"rl-{n}" for n in range(N)]
    counting.refuse_batches = (429, "rate_limited")
    async with Producer(counting.url, PRODUCER, retry=FAST, confirm_batching=WIDE) as producer:
        outcomes = dict(zip(ids, await together(producer, pool, ids), strict=True))
    shared = {i for c in counting.batches() if len(c.ids) > 1 for i in c.ids}
    assert shared
    singles = {c.ids[0] for c in counting.confirms() if c.path != "/v1/batch/confirm"}
    assert not shared & singles, singles
    assert all(isinstance(o, Sent) and not o.confirmed for i, o in outcomes.items() if i in shared)
    await check_back_until(runtime, pool, sdk_db, dict.fromkeys(shared, "sent"))


async def test_a_batch_refused_for_its_credential_tells_each_without_reruns(
    counting: CountingProxy, pool: asyncpg.Pool, sdk_db: asyncpg.Connection
) -> None:
    """A 401 for the whole batch is the token's, not one transaction's doing: each
    transaction of the batch gets that Unauthorized (as a lone confirm would), and no
    confirm is sent again on its own."""
    ids = [f"ua-{n}" for n in range(N)]
    counting.refuse_batches = (401, "unauthorized")
    async with Producer(counting.url, PRODUCER, retry=FAST, confirm_batching=WIDE) as producer:
        outcomes = dict(zip(ids, await together(producer, pool, ids), strict=True))
    shared = {i for c in counting.batches() if len(c.ids) > 1 for i in c.ids}
    assert shared
    singles = {c.ids[0] for c in counting.confirms() if c.path != "/v1/batch/confirm"}
    assert not shared & singles, singles
    assert all(isinstance(outcomes[i], Unauthorized) for i in shared), outcomes
