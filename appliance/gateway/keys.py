"""API keys in a local JSON file. Secrets are stored only as SHA-256 hashes.

The file is written atomically with mode 0600 under an exclusive lock, so the CLI and a
running server can both change it; the server re-reads it when its mtime changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import os
import secrets
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import msgspec

SCOPES = ("predict", "jobs", "admin")
SECRET_PREFIX = "apl_"


class ApiKey(msgspec.Struct, kw_only=True):
    id: str
    name: str
    hash: str
    scopes: list[str]
    models: list[str] = msgspec.field(default_factory=lambda: ["*"])
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    token_quota: int | None = None
    created_at: str
    expires_at: str | None = None
    revoked: bool = False

    def allows_scope(self, scope: str) -> bool:
        """ "any" is what endpoints open to every valid key ask for."""
        return scope == "any" or scope in self.scopes or "admin" in self.scopes

    def allows_model(self, slug: str) -> bool:
        return "*" in self.models or slug in self.models

    def expired(self, now: datetime | None = None) -> bool:
        if self.expires_at is None:
            return False
        expires = datetime.fromisoformat(self.expires_at)
        if expires.tzinfo is None:
            expires = expires.replace(tzinfo=timezone.utc)
        return (now or datetime.now(timezone.utc)) >= expires

    def public(self) -> dict[str, object]:
        """The key's fields without its hash."""
        data = msgspec.structs.asdict(self)
        data.pop("hash")
        return data


class _KeyFile(msgspec.Struct):
    keys: list[ApiKey] = msgspec.field(default_factory=list)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStoreError(ValueError):
    """A key operation was refused (bad scope, unknown id)."""


def new_key(
    name: str,
    scopes: list[str],
    *,
    models: list[str] | None = None,
    requests_per_minute: int | None = None,
    tokens_per_minute: int | None = None,
    token_quota: int | None = None,
    expires_at: str | None = None,
    secret: str | None = None,
) -> tuple[ApiKey, str]:
    """A new key and its secret, validated; every key store creates keys through this."""

    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise KeyStoreError(f"scopes must be among {', '.join(SCOPES)}; got {scopes}")
    if models is not None and not models:
        # An empty allowlist used to mean "every model": refuse it rather than guess.
        raise KeyStoreError("models must name at least one model (or *); omit it for all")
    secret = secret or SECRET_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        id="key_" + secrets.token_hex(8),
        name=name,
        hash=hash_secret(secret),
        scopes=list(dict.fromkeys(scopes)),
        models=["*"] if models is None else list(dict.fromkeys(models)),
        requests_per_minute=requests_per_minute,
        tokens_per_minute=tokens_per_minute,
        token_quota=token_quota,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        expires_at=expires_at,
    )
    return key, secret


UPDATABLE = frozenset(
    {"requests_per_minute", "tokens_per_minute", "token_quota", "models", "expires_at", "name"}
)
"""What `update` may change: limits, models, expiry, name (never the secret, id or scopes)."""


def check_update(fields: dict[str, object]) -> None:
    if unknown := set(fields) - UPDATABLE:
        raise KeyStoreError(f"cannot change {', '.join(sorted(unknown))}")


class KeyStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._path = str(path)
        self._stamp: tuple[int, int, int] | None = None
        self._by_hash: dict[str, ApiKey] = {}
        self._keys: list[ApiKey] = []

    # ---- file handling -------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(self.path.suffix + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> list[ApiKey]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        return msgspec.json.decode(raw, type=_KeyFile).keys

    def _write(self, keys: list[ApiKey]) -> None:
        data = msgspec.json.format(msgspec.json.encode(_KeyFile(keys)), indent=2)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def refresh(self) -> None:
        """Re-read the file if it changed since the last read (cheap: one stat). Changed is
        any of inode, size or mtime: every write replaces the file (a new inode), so a second
        change within one mtime tick (a key made, then revoked at once by the CLI or another
        worker) is still seen."""
        try:
            st = os.stat(self._path)  # os.stat on a str: no pathlib per request
            stamp: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp and stamp is not None:
            return
        self._keys = self._read()
        self._by_hash = {k.hash: k for k in self._keys}
        self._stamp = stamp

    # ---- operations ----------------------------------------------------------------------
    def create(
        self,
        name: str,
        scopes: list[str],
        *,
        models: list[str] | None = None,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        token_quota: int | None = None,
        expires_at: str | None = None,
        secret: str | None = None,
    ) -> tuple[ApiKey, str]:
        """Add a key; returns it and its secret, which is not stored anywhere. `secret` is for
        an operator-provided admin key (auth.admin_key_file); otherwise one is generated."""
        key, secret = new_key(
            name,
            scopes,
            models=models,
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
            token_quota=token_quota,
            expires_at=expires_at,
            secret=secret,
        )
        with self._locked():
            keys = self._read()
            keys.append(key)
            self._write(keys)
        self.refresh()
        return key, secret

    def revoke(self, key_id: str) -> ApiKey:
        with self._locked():
            keys = self._read()
            for key in keys:
                if key.id == key_id:
                    key.revoked = True
                    self._write(keys)
                    break
            else:
                raise KeyStoreError(f"no key with id {key_id}")
        self.refresh()
        return key

    def update(self, key_id: str, **fields: object) -> ApiKey:
        """Change a key's limits or models (not its secret, id or scopes)."""
        check_update(fields)
        with self._locked():
            keys = self._read()
            for i, key in enumerate(keys):
                if key.id == key_id:
                    keys[i] = msgspec.structs.replace(key, **fields)
                    self._write(keys)
                    break
            else:
                raise KeyStoreError(f"no key with id {key_id}")
        self.refresh()
        return keys[i]

    def get(self, key_id: str) -> ApiKey | None:
        self.refresh()
        return next((k for k in self._keys if k.id == key_id), None)

    def list(self) -> list[ApiKey]:
        self.refresh()
        return list(self._keys)

    def authenticate(self, secret: str) -> ApiKey | None:
        """The live key for a secret, or None (unknown, revoked or expired)."""
        self.refresh()
        digest = hash_secret(secret)
        key = self._by_hash.get(digest)
        if key is None or not hmac.compare_digest(key.hash, digest):
            return None
        if key.revoked or key.expired():
            return None
        return key
