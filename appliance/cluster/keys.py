"""API keys in PostgreSQL (SHA-256 hashes only, as in the keys file).

Authentication reads an in-memory copy, so a request never waits for PostgreSQL and keys
keep working while it is down. The copy is reloaded when another replica announces a change
(pub/sub: a revocation reaches every replica within milliseconds) and every few seconds in
case an announcement was missed."""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

from appliance.cluster.database import Database
from appliance.cluster.events import Events
from appliance.errors import BackendUnavailable
from appliance.gateway.keys import ApiKey, KeyStore, KeyStoreError, check_update, new_key

log = logging.getLogger("appliance.cluster")

COLUMNS = (
    "id, name, hash, scopes, models, requests_per_minute, tokens_per_minute, token_quota, "
    "created_at, expires_at, revoked"
)
REFRESH_SECONDS = 5.0


def _key(row: tuple[Any, ...]) -> ApiKey:
    names = [c.strip() for c in COLUMNS.split(",")]
    return ApiKey(**dict(zip(names, row, strict=True)))


class PgKeyStore(KeyStore):
    """The KeyStore interface on PostgreSQL."""

    def __init__(self, db: Database, events: Events | None = None) -> None:
        super().__init__(path=None)  # type: ignore[arg-type]
        self.db = db
        self.events = events
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loaded = False
        if events is not None:
            events.on("keys", lambda _: self.reload())

    def reload(self) -> None:
        with self.db.connection() as conn:
            rows = conn.execute(f"SELECT {COLUMNS} FROM api_keys ORDER BY created_at, id")
            rows = rows.fetchall()
        keys = [_key(r) for r in rows]
        self._keys, self._by_hash, self._loaded = keys, {k.hash: k for k in keys}, True

    def start(self) -> None:
        """Load, then keep reloading in the background."""
        self.reload()
        self._thread = threading.Thread(target=self._poll, name="keys-refresh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _poll(self) -> None:
        while not self._stop.wait(REFRESH_SECONDS):
            with contextlib.suppress(BackendUnavailable):  # the keys in memory keep serving
                self.reload()

    def refresh(self) -> None:
        if not self._loaded:  # the CLI, or a store used before start()
            self.reload()

    def _changed(self) -> None:
        self.reload()
        if self.events is not None:
            self.events.publish("keys")

    def _insert(self, key: ApiKey) -> None:
        with self.db.connection() as conn:
            conn.execute(
                f"INSERT INTO api_keys ({COLUMNS}) VALUES "
                "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (hash) DO NOTHING",
                (
                    key.id,
                    key.name,
                    key.hash,
                    key.scopes,
                    key.models,
                    key.requests_per_minute,
                    key.tokens_per_minute,
                    key.token_quota,
                    key.created_at,
                    key.expires_at,
                    key.revoked,
                ),
            )

    def create(self, name: str, scopes: list[str], **kwargs: Any) -> tuple[ApiKey, str]:
        key, secret = new_key(name, scopes, **kwargs)
        self._insert(key)
        self._changed()
        return key, secret

    def add(self, key: ApiKey) -> bool:
        """Copy an existing key (appliance cluster import); False if its hash is there."""
        with self.db.connection() as conn:
            found = conn.execute("SELECT 1 FROM api_keys WHERE hash = %s", (key.hash,)).fetchone()
        if found:
            return False
        self._insert(key)
        return True

    def revoke(self, key_id: str) -> ApiKey:
        with self.db.connection() as conn:
            row = conn.execute(
                f"UPDATE api_keys SET revoked = true WHERE id = %s RETURNING {COLUMNS}", (key_id,)
            ).fetchone()
        if row is None:
            raise KeyStoreError(f"no key with id {key_id}")
        self._changed()
        return _key(row)

    def update(self, key_id: str, **fields: object) -> ApiKey:
        check_update(fields)
        if not fields:
            key = self.get(key_id)
            if key is None:
                raise KeyStoreError(f"no key with id {key_id}")
            return key
        sets = ", ".join(f"{name} = %s" for name in fields)
        with self.db.connection() as conn:
            row = conn.execute(
                f"UPDATE api_keys SET {sets} WHERE id = %s RETURNING {COLUMNS}",
                (*fields.values(), key_id),
            ).fetchone()
        if row is None:
            raise KeyStoreError(f"no key with id {key_id}")
        self._changed()
        return _key(row)

    def get(self, key_id: str) -> ApiKey | None:
        self.refresh()
        return next((k for k in self._keys if k.id == key_id), None)

    def list(self) -> list[ApiKey]:
        self.refresh()
        return list(self._keys)
