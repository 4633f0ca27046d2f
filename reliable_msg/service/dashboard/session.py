"""Dashboard logins: a signed session cookie, and CSRF tokens tied to the session.

The signing key is derived from the admin token (HMAC-SHA256 keyed by the token over a
fixed label), so no other secret is needed, every instance of a deployment accepts the
others' cookies, and changing the admin token ends every session.

A cookie is ``<expires>.<nonce>.<mac>`` with ``mac = HMAC(key, "session|expires|nonce")``;
the CSRF token of a session is ``HMAC(key, "csrf|nonce")``. Both are compared in
constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

#: Name of the session cookie.
COOKIE = "rmsg_session"
#: Label the signing key is derived with; a new label would end every session.
_KEY_LABEL = b"reliable-msg dashboard session key v1"


@dataclass(frozen=True, slots=True)
class Session:
    nonce: str
    expires: int


class Sessions:
    """Issues and checks session cookies for the holder of ``admin_token``."""

    def __init__(self, admin_token: str | None, ttl: float) -> None:
        self._token_digest = _sha256(admin_token) if admin_token else None
        self._key = (
            hmac.new(admin_token.encode(), _KEY_LABEL, hashlib.sha256).digest()
            if admin_token
            else None
        )
        self.ttl = ttl

    @property
    def enabled(self) -> bool:
        """False without an admin token: nobody can log in."""
        return self._key is not None

    def login(self, token: str) -> bool:
        """Whether ``token`` is the admin token (constant time)."""
        if self._token_digest is None:
            return False
        return hmac.compare_digest(self._token_digest, _sha256(token.strip()))

    def issue(self, now: float | None = None) -> str:
        """A fresh cookie value, valid for ``ttl`` seconds."""
        expires = int((time.time() if now is None else now) + self.ttl)
        nonce = secrets.token_urlsafe(18)
        return f"{expires}.{nonce}.{self._mac('session', str(expires), nonce)}"

    def verify(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session of a cookie that is ours and not expired, else None."""
        if not cookie or self._key is None:
            return None
        parts = cookie.split(".")
        if len(parts) != 3 or not parts[0].isdigit():
            return None
        expires, nonce, mac = parts
        if not hmac.compare_digest(mac, self._mac("session", expires, nonce)):
            return None
        if int(expires) <= (time.time() if now is None else now):
            return None
        return Session(nonce, int(expires))

    def csrf(self, session: Session) -> str:
        """The CSRF token every form of this session must send back."""
        return self._mac("csrf", session.nonce)

    def check_csrf(self, session: Session, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf(session), token or "")

    def _mac(self, *parts: str) -> str:
        assert self._key is not None
        digest = hmac.new(self._key, "|".join(parts).encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def _sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()
