"""The dashboard in a real browser: headless Chromium (Debian's ``chromium``, driven by
Playwright's driver from PyPI, no browser download) against a real service process.

It logs in, finds a dead message, requeues it behind the confirmation page, sees it
``done`` once its groups ack, requeues a group's dead deliveries, logs out, and fails on
any console error, page error, failed request or HTTP error the pages ran into.
Screenshots of the pages go to ``.artifacts/screenshots/`` (:mod:`tests.helpers.browser`).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import httpx
import pytest
from playwright.async_api import Browser, Page

from reliable_msg.service.settings import Settings
from reliable_msg.transports.redis_client import redis_client
from reliable_msg.transports.switch import Switch
from tests.conftest import ADMIN, GROUP_TOKENS, PRODUCER, auth
from tests.helpers.browser import Problems, cells, log_in, shot
from tests.helpers.service import Instance, remove_traces, running, write_config
from tests.helpers.waiting import wait_until

#: Dead after one delivery not acked within ack_timeout.
ACK_TIMEOUT = 1.5


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(
        # Pending messages stay pending: nobody answers check-back here.
        checkback={"after": 3600.0},
        redelivery={"ack_timeout": ACK_TIMEOUT, "max_attempts": 1, "jitter": 0.0},
        monitor={"interval": 0.5, "counts_interval": 0.5},
        # A switch a test trips stays tripped: no probe publish clears it.
        fallback={"probe_interval": 3600.0},
    )


@pytest.fixture
async def service(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> AsyncIterator[Instance]:
    config = write_config(settings, tmp_path / "config.toml")
    try:
        with running(config, tmp_path) as [instance]:
            yield instance
    finally:
        await remove_traces(settings)


async def populate(api: httpx.AsyncClient) -> None:
    """Done, pending, cancelled and soon-dead messages on two topics."""
    producer = auth(PRODUCER)
    for i in range(1, 7):
        topic = "order.paid" if i % 3 else "order.refunded"
        body = {"id": f"ord-{i}", "topic": topic, "payload": {"order": i, "amount": 10 * i}}
        assert (await api.post("/v1/messages", json=body, headers=producer)).status_code == 201
        assert (await api.post(f"/v1/messages/ord-{i}/confirm", headers=producer)).is_success
        await ack_all(api, f"ord-{i}")
    extra = {
        "pending-1": "order.paid",
        "cancelled-1": "order.paid",
        "dead-1": "order.paid",
        "dead-2": "order.paid",
    }
    for id, topic in extra.items():
        body = {"id": id, "topic": topic, "payload": {"order": id}, "headers": {"trace": id}}
        assert (await api.post("/v1/messages", json=body, headers=producer)).status_code == 201
    assert (await api.post("/v1/messages/cancelled-1/cancel", headers=producer)).is_success
    for id in ("dead-1", "dead-2"):
        assert (await api.post(f"/v1/messages/{id}/confirm", headers=producer)).is_success


async def ack_all(api: httpx.AsyncClient, id: str) -> None:
    for token in GROUP_TOKENS.values():
        r = await api.post(f"/v1/messages/{id}/ack", headers=auth(token))
        assert r.status_code in (200, 404), r.text  # 404: the group does not take the topic


async def search(
    page: Page, *, status: str = "", topic: str = "", group: str = "", id: str = ""
) -> list[str]:
    """Fill the message list's search form, submit it, and return the ids listed."""
    await page.goto(page.url.split("/dashboard/")[0] + "/dashboard/messages")
    await page.select_option("select[name=status]", status)
    await page.fill("input[name=topic]", topic)
    await page.select_option("select[name=group]", group)
    await page.fill("input[name=id]", id)
    async with page.expect_navigation():
        await page.click("form.filters button[type=submit]")
    return await page.locator("table.messages tbody a.mono").all_text_contents()


async def status_of(db: asyncpg.Connection, id: str) -> str:
    status: str = await db.fetchval("SELECT status FROM rmsg_message WHERE id = $1", id)
    return status


async def test_dashboard_requeues_a_dead_message_until_done(
    service: Instance, browser: Browser, db: asyncpg.Connection
) -> None:
    async with httpx.AsyncClient(base_url=service.url, timeout=10) as api:
        await populate(api)

        async def both_dead() -> bool:
            return {await status_of(db, "dead-1"), await status_of(db, "dead-2")} == {"dead"}

        await wait_until(both_dead, within=ACK_TIMEOUT + 10)

        context = await browser.new_context(viewport={"width": 1280, "height": 900})
        page = await context.new_page()
        problems = Problems(page)

        # Nothing without a login: the overview sends the browser to the login form.
        await page.goto(f"{service.url}/dashboard/")
        assert "/dashboard/login" in page.url
        await shot(page, "login")
        await log_in(page)

        # The overview: live counts, the chart drawn from samples, groups and topics.
        # A locator, not wait_for_function: the page's CSP forbids evaluating strings.
        await page.locator("#chart-flow polyline").first.wait_for(state="attached", timeout=15_000)
        assert await page.text_content("#count-dead") == "2"
        assert await page.text_content("#count-done") == "6"
        assert await page.text_content("#broker-mode") == "normal"
        assert "order.refunded" in (await page.text_content("#topics-body") or "")
        await shot(page, "overview")

        # The list, filtered on dead, then the detail of one of them.
        await page.click("nav >> text=Dead")
        await page.wait_for_url(re.compile(r".*/messages\?status=dead$"))
        rows = await page.locator("table.messages tbody tr").all_text_contents()
        assert len(rows) == 2 and all("dead" in row for row in rows), rows
        await shot(page, "messages")

        # The search form: each filter and their combinations show exactly the matches.
        paid = ["ord-1", "ord-2", "ord-4", "ord-5"]
        assert await search(page, topic="order.refunded") == ["ord-3", "ord-6"]
        assert await search(page, group="inventory") == [*paid, "dead-1", "dead-2"]
        done = ["ord-1", "ord-2", "ord-3", "ord-4", "ord-5", "ord-6"]
        assert await search(page, group="credit", status="done") == done
        assert await search(page, topic="order.paid", status="pending") == ["pending-1"]
        assert await search(page, status="cancelled") == ["cancelled-1"]
        assert await search(page, topic="order.paid", group="wms", status="dead") == [
            "dead-1",
            "dead-2",
        ]
        assert await search(page, topic="order.refunded", group="inventory") == []
        assert await search(page, topic="not a topic") == []
        assert "'not a topic' is not a topic." in (await page.text_content("p.error") or "")
        await search(page, id="ord-4")
        await page.wait_for_url(re.compile(r".*/messages/ord-4$"))
        await shot(page, "messages-search")

        await page.goto(f"{service.url}/dashboard/messages?status=dead")
        await page.click("a.mono >> text=dead-1")
        await page.wait_for_url(re.compile(r".*/messages/dead-1$"))
        assert '"order": "dead-1"' in (await page.text_content("#payload") or "")
        assert await cells(page, "#headers tbody tr") == [["trace", "dead-1"]]
        deliveries = await cells(page, "#deliveries tbody tr")
        assert sorted(row[0] for row in deliveries) == ["credit", "inventory", "wms"], deliveries
        for group, status, attempts, _next, error, *_ in deliveries:
            assert (status, attempts) == ("dead", "1"), deliveries
            assert f"not acked by {group}" in error, deliveries
        assert "not acked by" in (await page.text_content("#last-error") or "")
        history = await cells(page, "#history tbody tr")
        moves = [(group, to, why) for _at, group, _from, to, why in history]
        assert ("message", "pending", "prepare") in moves, moves
        assert ("message", "sent", "confirm") in moves, moves
        for group in ("credit", "inventory", "wms"):
            assert (group, "dead", f"not acked by {group} after 1 deliveries") in moves, moves
        assert ("message", "dead") in [(g, to) for g, to, _why in moves], moves
        await shot(page, "message")

        # Requeue behind the confirmation page; the message is sent again.
        await page.click("#requeue")
        await page.wait_for_url(re.compile(r".*/messages/dead-1/requeue$"))
        await shot(page, "requeue-confirm")
        await page.click("#confirm-requeue")
        await page.wait_for_url(re.compile(r".*/messages/dead-1\?notice=requeued$"))
        assert await status_of(db, "dead-1") == "sent"
        # The consumers ack (through the HTTP API); the page follows the message to done.
        await ack_all(api, "dead-1")
        await page.wait_for_selector("h1 .status-done", timeout=15_000)
        assert await status_of(db, "dead-1") == "done"
        assert "requeue" in (await page.text_content("#history") or "")
        await shot(page, "message-done")

        # A group's dead deliveries, from the overview, behind the confirmation page.
        await page.goto(f"{service.url}/dashboard/")
        await page.click("#groups-body a.button[href$='/groups/inventory/requeue']")
        await page.wait_for_url(re.compile(r".*/groups/inventory/requeue$"))
        await shot(page, "group-requeue-confirm")
        await page.click("#confirm-requeue")
        await page.wait_for_url(re.compile(r".*/messages\?group=inventory.*"))
        notice = await page.text_content(".notice") or ""
        assert "Republished 1 dead delivery of group inventory" in notice, notice
        moved = await db.fetchval(
            "SELECT count(*) FROM rmsg_transition WHERE message_id = 'dead-2'"
            " AND group_name = 'inventory' AND reason = 'requeue'"
        )
        assert moved == 1

        # Keyset pages: every message once, in order, whatever the page size.
        [session] = [c["value"] for c in await context.cookies() if c["name"] == "rmsg_session"]
        cookie = {"Cookie": f"rmsg_session={session}"}
        seen: list[str] = []
        url: str | None = "/dashboard/messages?limit=4"
        while url is not None:
            listing = await api.get(url, headers=cookie)
            assert listing.status_code == 200
            seen += re.findall(r'class="mono" href="/dashboard/messages/([^"]+)"', listing.text)
            found = re.search(r'id="next-page" href="([^"]+)"', listing.text)
            url = found.group(1).replace("&amp;", "&") if found else None
        assert len(seen) == len(set(seen)) == 10
        unknown = await api.get("/dashboard/messages?id=nobody", headers=cookie)
        assert unknown.status_code == 404
        assert "No message has the id &#39;nobody&#39;" in unknown.text

        # A form without the session's CSRF token is refused, even with the cookie.
        forged = await api.post(
            "/dashboard/messages/dead-2/requeue", data={"csrf": "forged"}, headers=cookie
        )
        assert forged.status_code == 403

        await page.click("text=Log out")
        await page.wait_for_url(re.compile(r".*/dashboard/login\?notice=logged_out$"))
        await page.goto(f"{service.url}/dashboard/messages")
        assert "/dashboard/login" in page.url
        await context.close()

    assert problems.lines == []


async def test_dashboard_shows_the_degraded_mode_and_the_fallback_depth(
    service: Instance, browser: Browser, settings: Settings
) -> None:
    redis = redis_client(settings.redis_url)
    switch = Switch(redis, who="operator", namespace=settings.fallback.namespace)
    try:
        async with httpx.AsyncClient(base_url=service.url, timeout=10) as api:
            assert await switch.trip("RabbitMQ maintenance")

            async def degraded() -> bool:
                mode: str = (await api.get("/readyz")).json()["mode"]
                return mode == "degraded"

            await wait_until(degraded, within=30, every=0.2)
            # Confirmed while degraded: into the shards of the topic's one group, credit.
            producer = auth(PRODUCER)
            for i in (1, 2):
                body = {"id": f"refund-{i}", "topic": "order.refunded", "payload": {"n": i}}
                assert (await api.post("/v1/messages", json=body, headers=producer)).is_success
                r = await api.post(f"/v1/messages/refund-{i}/confirm", headers=producer)
                assert r.is_success, r.text

        context = await browser.new_context(viewport={"width": 1280, "height": 900})
        page = await context.new_page()
        problems = Problems(page)
        await page.goto(f"{service.url}/dashboard/login")
        await log_in(page)
        await page.locator("#chart-flow polyline").first.wait_for(state="attached", timeout=15_000)

        assert await page.text_content("#broker-mode") == "degraded"
        assert await page.text_content("#mode-badge") == "degraded"
        switched = await page.text_content("#broker-switch") or ""
        assert "degraded since" in switched and "by operator: RabbitMQ maintenance" in switched
        [row] = await cells(page, "#history-body tr")
        assert row[1:] == ["degraded", "operator", "RabbitMQ maintenance"], row
        depth = {row[0]: row[4] for row in await cells(page, "#groups-body tr")}
        assert depth == {"credit": "2", "inventory": "0", "wms": "0"}, depth
        await shot(page, "overview-degraded")
        await context.close()
        assert problems.lines == []
        # The same figures on /metrics.
        async with httpx.AsyncClient(base_url=service.url, timeout=10) as api:
            metrics = (await api.get("/metrics")).text
        assert "\nrmsg_degraded 1.0\n" in metrics
        assert '\nrmsg_fallback_depth{group="credit"} 2.0\n' in metrics
        assert '\nrmsg_fallback_depth{group="inventory"} 0.0\n' in metrics
    finally:
        await switch.clear("RabbitMQ maintenance over")
        await redis.aclose()


async def test_dashboard_shows_nothing_without_the_admin_token(service: Instance) -> None:
    async with httpx.AsyncClient(base_url=service.url, timeout=10) as api:
        for path in ("/dashboard/", "/dashboard/messages", "/dashboard/messages/x"):
            r = await api.get(path)
            assert r.status_code == 303 and "/dashboard/login" in r.headers["location"]
        assert (await api.get("/dashboard/api/overview")).status_code == 401
        # Logging out without a session (it ended in an old tab) lands logged out, not on
        # the login form sending back to /dashboard/logout, a POST only (405 after login).
        r = await api.post("/dashboard/logout", data={"csrf": "x"})
        assert r.status_code == 303, r.text
        assert r.headers["location"] == "/dashboard/login?notice=logged_out"
        wrong = await api.post("/dashboard/login", data={"token": PRODUCER})
        assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
        forged = {"Cookie": "rmsg_session=9999999999.abc.def"}
        assert (await api.get("/dashboard/api/overview", headers=forged)).status_code == 401
        right = await api.post("/dashboard/login", data={"token": ADMIN})
        assert right.status_code == 303
        cookie = right.headers["set-cookie"]
        assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
        assert "path=/dashboard" in cookie.lower()
        session = {"Cookie": cookie.split(";")[0]}
        assert (await api.get("/dashboard/api/overview", headers=session)).status_code == 200
