"""Every dashboard page, served by uvicorn over HTTP, carries the strict
Content-Security-Policy the README promises, word for word, and its companions."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from reliable_msg.service.api import create_app
from reliable_msg.service.runtime import Runtime
from tests.conftest import ADMIN, PRODUCER, auth
from tests.helpers.servers import serving_app

#: Written out here, not imported: a change to the policy must change this test too.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
COMPANIONS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@pytest.fixture
async def url(runtime: Runtime) -> AsyncIterator[str]:
    async with serving_app(create_app(runtime)) as url:
        yield url


def assert_strict(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, (r.request.url, r.text[:300])
    assert r.headers.get("Content-Security-Policy") == CSP, r.request.url
    for name, value in COMPANIONS.items():
        assert r.headers.get(name) == value, (r.request.url, name)


async def test_every_dashboard_page_sends_the_strict_policy(url: str) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        body = {"id": "csp-1", "topic": "order.paid", "payload": {"n": 1}}
        r = await http.post("/v1/messages", json=body, headers=auth(PRODUCER))
        assert r.status_code == 201, r.text
        begin = {"gid": "csp-tx", "timeout": 60}
        r = await http.post("/v1/tcc/transactions", json=begin, headers=auth(PRODUCER))
        assert r.status_code == 201, r.text

        assert_strict(await http.get("/dashboard/login"), 200)
        assert_strict(await http.get("/dashboard/"), 303)  # to the login page
        assert_strict(await http.post("/dashboard/login", data={"token": "no"}), 401)
        assert_strict(await http.post("/dashboard/login", data={"token": ADMIN}), 303)
        assert "rmsg_session" in http.cookies

        for path in (
            "/dashboard/",
            "/dashboard/messages",
            "/dashboard/messages?status=pending",
            "/dashboard/messages/csp-1",
            "/dashboard/messages/csp-1/requeue",
            "/dashboard/groups/wms/requeue",
            "/dashboard/tcc",
            "/dashboard/tcc?status=confirming&stalled=true",
            "/dashboard/tcc/csp-tx",
            "/dashboard/tcc/csp-tx/retry",
        ):
            assert_strict(await http.get(path), 200)
        assert_strict(await http.get("/dashboard/messages/nobody"), 404)
        assert_strict(await http.get("/dashboard/tcc/nobody"), 404)
        assert_strict(await http.post("/dashboard/groups/wms/requeue", data={"csrf": "x"}), 403)
        assert_strict(await http.post("/dashboard/tcc/csp-tx/retry", data={"csrf": "x"}), 403)
