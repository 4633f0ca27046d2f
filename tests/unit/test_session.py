"""Dashboard sessions and CSRF tokens: signed, expiring, tied to the admin token."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from reliable_msg.service.dashboard.session import Sessions

NOW = 1_800_000_000.0


def test_a_login_issues_a_cookie_that_verifies_until_it_expires() -> None:
    sessions = Sessions("admin-token", ttl=60)
    assert sessions.login("admin-token") and sessions.login(" admin-token\n")
    assert not sessions.login("admin-token2") and not sessions.login("")
    cookie = sessions.issue(now=NOW)
    session = sessions.verify(cookie, now=NOW + 59)
    assert session is not None and session.expires == NOW + 60
    assert sessions.verify(cookie, now=NOW + 60) is None


@pytest.mark.parametrize(
    "tamper",
    [
        lambda c: c.replace(c.split(".")[0], str(int(c.split(".")[0]) + 3600)),  # longer life
        lambda c: c[:-2] + ("AA" if not c.endswith("AA") else "BB"),  # another mac
        lambda c: "x" + c,
        lambda c: c.rsplit(".", 1)[0],
        lambda c: "",
    ],
    ids=["expiry", "mac", "prefix", "no-mac", "empty"],
)
def test_a_tampered_cookie_is_refused(tamper: Callable[[str], str]) -> None:
    sessions = Sessions("admin-token", ttl=60)
    cookie = sessions.issue(now=NOW)
    assert sessions.verify(tamper(cookie), now=NOW) is None


def test_a_new_admin_token_ends_every_session() -> None:
    cookie = Sessions("old-token", ttl=60).issue(now=NOW)
    assert Sessions("new-token", ttl=60).verify(cookie, now=NOW) is None


def test_csrf_tokens_belong_to_one_session() -> None:
    sessions = Sessions("admin-token", ttl=60)
    one = sessions.verify(sessions.issue(now=NOW), now=NOW)
    two = sessions.verify(sessions.issue(now=NOW), now=NOW)
    assert one is not None and two is not None
    assert sessions.check_csrf(one, sessions.csrf(one))
    assert not sessions.check_csrf(one, sessions.csrf(two))
    assert not sessions.check_csrf(one, None) and not sessions.check_csrf(one, "")


def test_without_an_admin_token_nobody_logs_in() -> None:
    sessions = Sessions(None, ttl=60)
    assert not sessions.enabled and not sessions.login("")
    assert sessions.verify("1.a.b", now=NOW) is None
