"""Bearer tokens, the three roles (producer, consumer group and admin) and the rate
limit per credential."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from reliable_msg.errors import Forbidden, RateLimited, Unauthorized
from reliable_msg.metrics import RATE_LIMITED
from reliable_msg.service.ratelimit import RateLimiter
from reliable_msg.service.settings import Settings


class Role(StrEnum):
    PRODUCER = "producer"  #: prepares, confirms and cancels its own messages
    GROUP = "group"  #: acks deliveries to its consumer group
    ADMIN = "admin"  #: reads everything, requeues dead messages


@dataclass(frozen=True, slots=True)
class Principal:
    role: Role
    name: str

    def require(self, *roles: Role) -> Principal:
        if self.role not in roles:
            allowed = " or ".join(r.value for r in roles)
            raise Forbidden(f"this call needs a {allowed} token; this is a {self.role} token")
        return self


class Authenticator:
    """Maps a bearer token to its principal, and keeps each credential to its rate limit.

    Tokens are compared by their SHA-256 digests with :func:`hmac.compare_digest`
    against every known token, so timing reveals neither which token matched nor how
    much of one did; tokens are never logged.
    """

    def __init__(self, settings: Settings) -> None:
        limits = settings.limits
        self._limiter = RateLimiter(limits.rate, limits.bucket) if limits.enabled else None
        dashboard = settings.dashboard
        #: Failed dashboard logins per client address (always on: it only slows guesses).
        self.logins = RateLimiter(1.0 / dashboard.login_interval, dashboard.login_failures)
        self._known: list[tuple[bytes, Principal]] = []
        if settings.admin_token is not None:
            self._add(settings.admin_token.get_secret_value(), Principal(Role.ADMIN, "admin"))
        for name, producer in settings.producers.items():
            if producer.token is not None:
                self._add(producer.token.get_secret_value(), Principal(Role.PRODUCER, name))
        for name, group in settings.groups.items():
            if group.token is not None:
                self._add(group.token.get_secret_value(), Principal(Role.GROUP, name))

    def _add(self, token: str, principal: Principal) -> None:
        self._known.append((_digest(token), principal))

    def admit(self, authorization: Sequence[str], address: str) -> Principal:
        """The principal of a request within its rate limit: the credential's own, or
        that of the client ``address`` for a request without a valid token.

        Raises :class:`Unauthorized` or :class:`RateLimited`.
        """
        try:
            who = self.identify(authorization)
        except Unauthorized:
            self._throttle(f"address {address}", "anonymous", "from this address")
            raise
        self._throttle(f"{who.role} {who.name}", who.role, f"for the {who.role} {who.name!r}")
        return who

    def _throttle(self, key: str, role: str, whose: str) -> None:
        if self._limiter is None:
            return
        wait = self._limiter.take(key)
        if wait:
            RATE_LIMITED.labels(role).inc()
            raise RateLimited(
                f"too many requests {whose}: the limit is {self._limiter.rate:g} a second, "
                f"{self._limiter.burst} at once; retry in {wait:.3g} s",
                retry_after=wait,
            )

    def identify(self, authorization: Sequence[str]) -> Principal:
        """The principal of the request's Authorization header values."""
        if len(authorization) > 1:
            # Which one counts would depend on who reads them (a proxy that adds its own).
            raise Unauthorized("send exactly one Authorization header, not several")
        if not authorization or not authorization[0]:
            raise Unauthorized("missing Authorization: Bearer <token> header")
        scheme, _, token = authorization[0].partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <token>'")
        digest = _digest(token.strip())
        found: Principal | None = None
        for known, principal in self._known:
            if hmac.compare_digest(known, digest):
                found = principal
        if found is None:
            raise Unauthorized("unknown token")
        return found


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
