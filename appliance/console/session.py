"""Console sessions: a signed cookie naming the key, and CSRF tokens tied to it.

The cookie holds the key's id, an expiry and an HMAC (keyed by a secret made at first start,
kept 0600 in the data dir) over both and the key's hash, never the key's secret. Every
request re-reads the key from the KeyStore, so a revoked or expired key's session ends at
its next request. The CSRF token of a session is an HMAC of its cookie; before sign-in, the
login form is protected by a random double-submit cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from litestar.connection import ASGIConnection
from litestar.datastructures import Cookie

from appliance.gateway.keys import ApiKey, KeyStore

COOKIE = "appliance_console"
LOGIN_CSRF_COOKIE = "appliance_console_login"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf"
SESSION_SECONDS = 8 * 3600
PATH = "/console"


def load_secret(path: Path) -> bytes:
    """The signing secret, made at first start; O_EXCL so two processes starting together
    cannot each write their own."""
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return bytes.fromhex(path.read_text().strip())
    secret = secrets.token_bytes(32)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret.hex() + "\n")
    return secret


@dataclass
class Sessions:
    keys: KeyStore
    secret_path: Path
    lifetime: int = SESSION_SECONDS
    _secret: bytes | None = None
    shared_secret: Callable[[], bytes] | None = None
    """Cluster mode: the secret every replica signs with (kept in PostgreSQL), so a session
    made on one replica is valid on the others; None: the file in data_dir."""

    @property
    def secret(self) -> bytes:
        if self._secret is None:
            load = self.shared_secret or (lambda: load_secret(self.secret_path))
            self._secret = load()
        return self._secret

    def _mac(self, *parts: str) -> str:
        return hmac.new(self.secret, "|".join(parts).encode(), hashlib.sha256).hexdigest()

    def issue(self, key: ApiKey, now: float | None = None) -> tuple[str, int]:
        """A cookie value for `key` and its lifetime in seconds (capped by the key's expiry)."""
        now = now or time.time()
        lifetime = self.lifetime
        if key.expires_at is not None:
            left = datetime.fromisoformat(key.expires_at)
            if left.tzinfo is None:
                left = left.replace(tzinfo=timezone.utc)
            lifetime = max(0, min(lifetime, int(left.timestamp() - now)))
        value = f"{key.id}.{int(now + lifetime)}"
        return f"{value}.{self._mac('session', value, key.hash)}", lifetime

    def key_of(self, value: str | None, now: float | None = None) -> ApiKey | None:
        """The live key a cookie names, or None (bad signature, expired, key revoked)."""
        if not value or value.count(".") != 2:
            return None
        key_id, expires, mac = value.split(".")
        if not expires.isdigit() or int(expires) <= (now or time.time()):
            return None
        key = self.keys.get(key_id)
        if key is None:
            return None
        expected = self._mac("session", f"{key_id}.{expires}", key.hash)
        if not hmac.compare_digest(mac, expected):
            return None
        if key.revoked or key.expired():
            return None
        return key

    def csrf_token(self, session: str) -> str:
        return self._mac("csrf", session)[:40]

    def csrf_ok(self, session: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf_token(session), token or "")


def is_https(connection: ASGIConnection[Any, Any, Any, Any]) -> bool:
    return connection.url.scheme == "https"


def session_cookie(
    connection: ASGIConnection[Any, Any, Any, Any], value: str, max_age: int
) -> Cookie:
    return Cookie(
        key=COOKIE,
        value=value,
        path=PATH,
        max_age=max_age,
        httponly=True,
        samesite="strict",
        secure=is_https(connection),
    )


def cleared_cookie(connection: ASGIConnection[Any, Any, Any, Any], name: str = COOKIE) -> Cookie:
    return Cookie(
        key=name,
        value="",
        path=PATH,
        max_age=0,
        httponly=True,
        samesite="strict",
        secure=is_https(connection),
    )


def login_csrf_cookie(connection: ASGIConnection[Any, Any, Any, Any], token: str) -> Cookie:
    return Cookie(
        key=LOGIN_CSRF_COOKIE,
        value=token,
        path=PATH,
        max_age=3600,
        httponly=True,
        samesite="strict",
        secure=is_https(connection),
    )
