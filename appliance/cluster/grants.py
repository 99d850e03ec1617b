"""Upload-URL grants (POST /upload-url) in PostgreSQL: a URL issued by one replica may be
PUT to any other. Only the token's SHA-256 is stored (as a key's secret is); redeeming
deletes the row in the same statement, so a URL works once even when two replicas receive
it at once."""

from __future__ import annotations

import time
from typing import Any

from appliance.cluster.database import Database
from appliance.gateway.keys import hash_secret


class PgGrants:
    def __init__(self, db: Database) -> None:
        self.db = db

    def put(self, token: str, slug: str, task: str | None, expires: float) -> None:
        with self.db.connection() as conn:
            conn.execute("DELETE FROM upload_grants WHERE expires_at < %s", (time.time(),))
            conn.execute(
                "INSERT INTO upload_grants (token_hash, slug, task, expires_at) "
                "VALUES (%s, %s, %s, %s)",
                (hash_secret(token), slug, task, expires),
            )

    def take(self, token: str) -> tuple[Any, ...] | None:
        """(slug, task, expires) of an unexpired grant, removed as it is read; else None."""
        with self.db.connection() as conn:
            row = conn.execute(
                "DELETE FROM upload_grants WHERE token_hash = %s AND expires_at >= %s "
                "RETURNING slug, task, expires_at",
                (hash_secret(token), time.time()),
            ).fetchone()
        return row
