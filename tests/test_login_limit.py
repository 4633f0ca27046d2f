"""Failed dashboard logins are limited per client address, on the real app served by
uvicorn over HTTP: the guesses of one address get 429 with Retry-After, while the admin
logs in from another address at once."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from reliable_msg.service.api import create_app
from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings
from tests.conftest import ADMIN
from tests.helpers.servers import serving_app

FAILURES = 3
INTERVAL = 60.0
#: Another loopback address: the server on 127.0.0.1 sees it as a client of its own.
OTHER_ADDRESS = "127.0.0.2"


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(dashboard={"login_failures": FAILURES, "login_interval": INTERVAL})


@pytest.fixture
async def url(runtime: Runtime) -> AsyncIterator[str]:
    async with serving_app(create_app(runtime)) as url:
        yield url


def client(url: str, address: str = "127.0.0.1") -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(local_address=address)
    return httpx.AsyncClient(base_url=url, transport=transport)


async def log_in(http: httpx.AsyncClient, token: str) -> httpx.Response:
    return await http.post("/dashboard/login", data={"token": token, "next": ""})


async def test_failed_logins_of_one_address_are_slowed_not_the_admin_elsewhere(
    url: str,
) -> None:
    async with client(url) as guesser, client(url, OTHER_ADDRESS) as admin:
        for i in range(FAILURES):
            r = await log_in(guesser, f"guess-{i}")
            assert r.status_code == 401, r.text
            assert "That is not the admin token." in r.text
        over = await log_in(guesser, "guess-more")
        assert over.status_code == 429, over.text
        retry = int(over.headers["Retry-After"])
        assert INTERVAL - 5 <= retry <= INTERVAL
        assert f"Too many failed logins from your address: try again in {retry} s." in over.text
        assert "rmsg_session" not in over.cookies
        # Over the limit the token is not even compared: the right one gets no session.
        right = await log_in(guesser, ADMIN)
        assert right.status_code == 429 and "rmsg_session" not in right.cookies

        elsewhere = await log_in(admin, ADMIN)
        assert elsewhere.status_code == 303, elsewhere.text
        assert elsewhere.headers["location"].endswith("/dashboard/")
        assert "rmsg_session" in elsewhere.cookies
        page = await admin.get("/dashboard/")
        assert page.status_code == 200 and "Log in" not in page.text
        # That address has a budget of its own, and a success spends none of it.
        for i in range(FAILURES):
            assert (await log_in(admin, f"typo-{i}")).status_code == 401
        assert (await log_in(admin, "typo")).status_code == 429


async def test_a_correct_login_spends_nothing(url: str) -> None:
    async with client(url) as http:
        for _ in range(FAILURES + 2):
            r = await log_in(http, ADMIN)
            assert r.status_code == 303, r.text
            http.cookies.clear()
