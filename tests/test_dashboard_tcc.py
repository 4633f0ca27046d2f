"""The dashboard's TCC page in a real browser (headless Chromium, as in
:mod:`tests.test_dashboard`) against a real service process whose coordinator calls two
participants served over HTTP.

Four transactions of the seed's pay-order: confirmed, cancelled, trying, and one
stalled confirming, its inventory branch failing with an error text that is hostile
HTML. The list and its filters, the detail with its branches and event log, retry now
behind its confirmation (refused without the session's CSRF token, changing nothing),
the event log's cap, and the login every page needs. Screenshots go to
``.artifacts/screenshots/tcc-*.png``.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import asyncpg
import httpx
import pytest
from playwright.async_api import Browser, Page

from reliable_msg.service.dashboard.tcc import EVENTS_SHOWN
from reliable_msg.service.settings import Settings
from tests.conftest import ADMIN
from tests.helpers.browser import Problems, cells, log_in, shot
from tests.helpers.service import Instance
from tests.helpers.tcc import TOKENS, Scripted, serving
from tests.helpers.tcc_api import snapshot
from tests.helpers.tcc_served import coordinator, decide, events, finished, initiator, start
from tests.helpers.waiting import wait_until

#: What the failing participant answers: markup and both quotes, to be shown as text.
HOSTILE = """<script>alert("x")</script><b onmouseover='alert(1)'>out of stock</b>"""
#: The failing branch's wait after its first failure: far beyond the test, so that the
#: coordinator calls it again only when retry now asks.
BACKOFF = 300.0


@dataclass
class Shop:
    service: Instance
    inventory: Scripted
    credit: Scripted


@pytest.fixture
async def shop(
    make_settings: Callable[..., Settings], db: asyncpg.Connection, tmp_path: Path
) -> AsyncIterator[Shop]:
    """The service with inventory and credit as participants, and the four
    transactions: pay-1 confirmed, pay-2 cancelled, pay-3 trying, pay-4 stalled."""
    inventory, credit = Scripted("inventory"), Scripted("credit")
    async with AsyncExitStack() as stack:
        participants = {}
        for party in (inventory, credit):
            url = await stack.enter_async_context(serving(party.app()))
            participants[party.name] = {"url": f"{url}/{party.name}", "token": TOKENS[party.name]}
        config = coordinator(
            make_settings,
            tmp_path,
            stack,
            participants,
            backoff_base=BACKOFF,
            backoff_cap=BACKOFF,
            stalled_after=1.0,
        )
        service = await start(stack, config, tmp_path, "serve-0")
        shop = Shop(service, inventory, credit)
        await pay(shop, "pay-1", inventory="stock", credit="points")
        await decide(service, "pay-1")
        await pay(shop, "pay-2", credit="points")
        await decide(service, "pay-2", "cancel")
        await pay(shop, "pay-3", inventory="stock")
        await finished(db, "pay-1")
        await finished(db, "pay-2", "cancelled")
        inventory.answers, inventory.error = [503], HOSTILE
        await pay(shop, "pay-4", inventory="stock", credit="points")
        await decide(service, "pay-4")

        async def flagged() -> bool:
            return "stalled" in [e["op"] for e in await events(db, "pay-4")]

        await wait_until(flagged, within=30, every=0.2)
        yield shop


async def pay(shop: Shop, gid: str, **branches: str) -> None:
    """Begin ``gid`` and register a branch at each participant, named as given."""
    async with initiator(shop.service) as api:
        r = await api.post("/v1/tcc/transactions", json={"gid": gid, "timeout": 600})
        assert r.status_code == 201, r.text
        body = [
            {"branch": branch, "participant": participant, "payload": {"qty": 2}}
            for participant, branch in branches.items()
        ]
        r = await api.post(f"/v1/tcc/transactions/{gid}/branches", json={"branches": body})
        assert r.status_code == 200, r.text


async def search(
    page: Page, *, status: str = "", participant: str = "", stalled: str = "", gid: str = ""
) -> list[str]:
    """Fill the TCC list's search form, submit it, and return the gids listed."""
    await page.goto(page.url.split("/dashboard/")[0] + "/dashboard/tcc")
    await page.select_option("select[name=status]", status)
    await page.select_option("select[name=participant]", participant)
    await page.select_option("select[name=stalled]", stalled)
    await page.fill("input[name=gid]", gid)
    async with page.expect_navigation():
        await page.click("form.filters button[type=submit]")
    return await listed(page)


async def listed(page: Page) -> list[str]:
    return await page.locator("table.transactions tbody a.mono").all_text_contents()


async def test_the_tcc_page_lists_shows_and_retries_a_stalled_transaction(
    shop: Shop, browser: Browser, db: asyncpg.Connection
) -> None:
    url = shop.service.url
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    problems = Problems(page)
    await page.goto(f"{url}/dashboard/login")
    await log_in(page)

    # The list, from the navigation: newest first, the stalled one highlighted.
    await page.click("nav >> text=TCC")
    await page.wait_for_url(re.compile(r".*/dashboard/tcc$"))
    assert await listed(page) == ["pay-4", "pay-3", "pay-2", "pay-1"]
    rows = {row[0]: row[1] for row in await cells(page, "table.transactions tbody tr")}
    assert rows == {
        "pay-4": "confirming stalled",
        "pay-3": "trying",
        "pay-2": "cancelled",
        "pay-1": "confirmed",
    }, rows
    assert await page.locator("tr.stalled a.mono").all_text_contents() == ["pay-4"]
    await shot(page, "tcc-list")

    # Each filter and their combinations show exactly the matches.
    assert await search(page, status="confirmed") == ["pay-1"]
    assert await search(page, participant="credit") == ["pay-4", "pay-2", "pay-1"]
    assert await search(page, participant="inventory", status="trying") == ["pay-3"]
    assert await search(page, stalled="true") == ["pay-4"]
    assert await search(page, stalled="false") == ["pay-3", "pay-2", "pay-1"]
    assert await search(page, participant="inventory", status="cancelled") == []
    await page.click(".tabs >> text=stalled")
    await page.wait_for_url(re.compile(r".*/tcc\?stalled=true$"))
    assert await listed(page) == ["pay-4"]
    await search(page, gid="pay-2")
    await page.wait_for_url(re.compile(r".*/tcc/pay-2$"))

    # The stalled one's detail: each branch, the participant's error as text, the log.
    await page.goto(f"{url}/dashboard/tcc?status=confirming")
    await page.click("a.mono >> text=pay-4")
    await page.wait_for_url(re.compile(r".*/tcc/pay-4$"))
    branches = {row[0]: row[1:] for row in await cells(page, "#branches tbody tr")}
    points, stock = branches["points"], branches["stock"]
    assert points[:5] == ["credit", "confirmed", "1", "—", "200"], points
    assert stock[:3] == ["inventory", "registered", "1"] and stock[4] == "503", stock
    assert stock[3] != "—"  # its next try, BACKOFF away
    said = json.dumps({"status": 503, "error": HOSTILE}, separators=(",", ":"))
    assert stock[5] == f"HTTP 503: {said}", stock
    log = [(e[1], e[2], e[3], e[4]) for e in await cells(page, "#events tbody tr")]
    assert log[:4] == [
        ("—", "begin", "ok", ""),
        ("stock", "register", "ok", ""),
        ("points", "register", "ok", ""),
        ("—", "commit", "ok", ""),
    ], log
    assert sorted(log[4:6]) == [
        ("points", "confirm", "ok", "200"),
        ("stock", "confirm", "failed", "503"),
    ], log
    assert log[6:] == [("—", "stalled", "ok", "")], log
    assert await page.locator("#stalled-note").is_visible()
    assert await page.locator("script").count() == 1  # dashboard.js, no other
    await shot(page, "tcc-detail")

    # A retry without the session's CSRF token, or with a wrong one, or another
    # session's, or without a session, is refused and changes nothing.
    [session] = [c["value"] for c in await context.cookies() if c["name"] == "rmsg_session"]
    cookie = {"Cookie": f"rmsg_session={session}"}
    before, calls = await snapshot(db), list(shop.inventory.calls)
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        assert (await http.post("/dashboard/login", data={"token": ADMIN})).status_code == 303
        theirs = re.findall(r'name="csrf" value="([^"]+)"', (await http.get("/dashboard/")).text)
        http.cookies.clear()  # that other session's cookie, kept by the client
        for form_data, headers, status in (
            ({}, cookie, 403),
            ({"csrf": "forged"}, cookie, 403),
            ({"csrf": ""}, cookie, 403),
            ({"csrf": theirs[0]}, cookie, 403),
            ({"csrf": "forged"}, {}, 303),
        ):
            r = await http.post("/dashboard/tcc/pay-4/retry", data=form_data, headers=headers)
            assert r.status_code == status, (form_data, r.text[:300])
    assert await snapshot(db) == before
    assert shop.inventory.calls == calls

    # Retry now, behind its confirmation: the failing branch is called at once and
    # answers 200 this time; the page follows the transaction to confirmed.
    await page.click("#retry")
    await page.wait_for_url(re.compile(r".*/tcc/pay-4/retry$"))
    text = " ".join((await page.text_content("section.confirm") or "").split())
    assert "1 unfinished branch (stock at inventory)" in text, text
    await shot(page, "tcc-retry-confirm")
    await page.click("#confirm-retry")
    await page.wait_for_url(re.compile(r".*/tcc/pay-4(\?notice=retried)?$"))
    await page.wait_for_selector("h1 .status-confirmed", timeout=15_000)
    branches = {row[0]: row[1:] for row in await cells(page, "#branches tbody tr")}
    assert branches["stock"][:5] == ["inventory", "confirmed", "2", "—", "200"], branches
    log = [(e[1], e[2], e[3], e[4]) for e in await cells(page, "#events tbody tr")]
    assert log[7:] == [
        ("—", "retry", "ok", ""),
        ("stock", "confirm", "ok", "200"),
        ("—", "confirmed", "ok", ""),
    ], log
    assert not await page.locator("#retry").count()  # confirmed: nothing to retry
    await shot(page, "tcc-retried")
    assert [c for c in shop.inventory.calls if c[0] == "pay-4"] == [
        ("pay-4", "stock", "confirm"),
        ("pay-4", "stock", "confirm"),
    ]

    csrf = await page.get_attribute("form.logout input[name=csrf]", "value") or ""
    await check_by_http(url, cookie, csrf, db)

    # Logged out, every TCC page sends the browser to the login form.
    await page.click("text=Log out")
    await page.wait_for_url(re.compile(r".*/dashboard/login\?notice=logged_out$"))
    for path in ("/dashboard/tcc", "/dashboard/tcc/pay-4", "/dashboard/tcc/pay-4/retry"):
        await page.goto(url + path)
        assert page.url == f"{url}/dashboard/login?next={quote(path)}", page.url
    await context.close()
    assert problems.lines == []


async def check_by_http(
    url: str, cookie: dict[str, str], csrf: str, db: asyncpg.Connection
) -> None:
    """What the browser should not run into: a refused retry, the pages of the list,
    hostile gids, a long log."""
    async with httpx.AsyncClient(base_url=url, timeout=10, headers=cookie) as http:
        # Retry now of a finished or a trying transaction: its page says why not and has
        # nothing to confirm (not the Cancel "called at once" of a trying one); a POST is
        # refused with the reason, nothing written.
        for gid, said in (("pay-1", "It is confirmed: only"), ("pay-3", "It is trying: only")):
            form = await http.get(f"/dashboard/tcc/{gid}/retry")
            assert said in form.text, form.text
            assert "called at once" not in form.text and "confirm-retry" not in form.text
        before = await snapshot(db)
        r = await http.post("/dashboard/tcc/pay-1/retry", data={"csrf": csrf})
        assert r.status_code == 409 and "transaction &#39;pay-1&#39; is confirmed" in r.text
        assert "confirm-retry" not in r.text
        unknown = await http.post("/dashboard/tcc/pay-9/retry", data={"csrf": csrf})
        assert unknown.status_code == 404 and "No transaction has the gid" in unknown.text
        assert await snapshot(db) == before

        # A filter that is none: said, and nothing listed.
        for query, said in (
            ("status=paid", "&#39;paid&#39; is not a status."),
            ("participant=Inventory!", "&#39;Inventory!&#39; is not a participant&#39;s name."),
            ("stalled=maybe", "&#39;maybe&#39; is not true or false."),
        ):
            r = await http.get(f"/dashboard/tcc?{query}")
            assert r.status_code == 200 and said in r.text, (query, r.text[:300])
            assert "no transaction matches" in r.text

        # Keyset pages: every transaction once, newest first, whatever the page size.
        seen: list[str] = []
        page: str | None = "/dashboard/tcc?limit=3"
        while page is not None:
            listing = await http.get(page)
            assert listing.status_code == 200
            seen += re.findall(r'class="mono" href="/dashboard/tcc/([^"]+)"', listing.text)
            found = re.search(r'id="next-page" href="([^"]+)"', listing.text)
            page = found.group(1).replace("&amp;", "&") if found else None
        assert seen == ["pay-4", "pay-3", "pay-2", "pay-1"]
        edited = await http.get("/dashboard/tcc?limit=3&cursor=not-a-cursor")
        assert edited.status_code == 200 and 'id="next-page"' in edited.text  # the first page

        # A gid searched for, or in the path, is shown as text.
        hostile = """"><img src=x onerror='alert(1)'>"""
        for r in (
            await http.get("/dashboard/tcc", params={"gid": hostile}),
            await http.get(f"/dashboard/tcc/{quote(hostile, safe='')}"),
            await http.get(f"/dashboard/tcc/{quote(hostile, safe='')}/retry"),
        ):
            assert r.status_code == 404, r.text[:300]
            assert "No transaction has the gid" in r.text, r.text[:300]
            assert "&#34;&gt;&lt;img src=x onerror=" in r.text and "<img" not in r.text
        detail = await http.get("/dashboard/tcc/pay-4")
        assert "&lt;script&gt;alert(\\&#34;x\\&#34;)" in detail.text
        assert "<script>alert" not in detail.text and "<b onmouseover" not in detail.text

        # A log longer than the page shows: the latest, and how many are left out.
        await db.execute(
            "INSERT INTO rmsg_tcc_event (gid, branch, op, outcome, http_status, error, instance)"
            " SELECT 'pay-3', 'stock', 'confirm', 'failed', 503, 'failure ' || i, 'test'"
            " FROM generate_series(1, $1::int) i",
            EVENTS_SHOWN + 5,
        )
        text = (await http.get("/dashboard/tcc/pay-3")).text
        assert "7 earlier events not shown; the latest 100 follow." in text
        assert text.count('<tr class="outcome-') == EVENTS_SHOWN
        assert f"failure {EVENTS_SHOWN + 5}<" in text and "failure 5<" not in text
        assert "failure 6<" in text
