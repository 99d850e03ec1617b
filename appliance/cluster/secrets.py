"""Secrets every replica must share (the console's cookie-signing key): made once by
whichever replica asks first, kept in PostgreSQL. One INSERT ... ON CONFLICT DO NOTHING
then a read, so replicas starting together still agree on one value."""

from __future__ import annotations

import secrets

from appliance.cluster.database import Database


class SharedSecrets:
    def __init__(self, db: Database) -> None:
        self.db = db

    def get(self, name: str) -> bytes:
        with self.db.connection() as conn:
            conn.execute(
                "INSERT INTO secrets (name, value) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
                (name, secrets.token_bytes(32).hex()),
            )
            row = conn.execute("SELECT value FROM secrets WHERE name = %s", (name,)).fetchone()
        assert row is not None
        return bytes.fromhex(row[0])
