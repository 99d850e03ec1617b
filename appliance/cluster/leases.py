"""Leases in PostgreSQL: which replica runs a batch job (or builds an uploaded model).

A lease is taken with one statement that succeeds only if nobody holds it or its holder let
it expire — no check-then-act — and renewed by its holder every few seconds (each committed
chunk renews it too). When a replica dies, its leases expire after TTL seconds and another
replica takes the job over from its last checkpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the job runner imports LeaseLost on a single box too: no psycopg there
    from appliance.cluster.database import Database

TTL_SECONDS = 15
RENEW_SECONDS = 4


class LeaseLost(Exception):
    """Another replica holds the lease now: stop without writing."""


class Leases:
    def __init__(self, db: Database, replica: str, *, ttl: float = TTL_SECONDS) -> None:
        self.db = db
        self.replica = replica
        self.ttl = ttl

    def acquire(self, name: str, table: str = "job_leases", ttl: float | None = None) -> bool:
        column = "job_id" if table == "job_leases" else "slug"
        with self.db.connection() as conn:
            row = conn.execute(
                f"INSERT INTO {table} ({column}, replica, expires_at) "
                "VALUES (%s, %s, now() + make_interval(secs => %s)) "
                f"ON CONFLICT ({column}) DO UPDATE SET replica = excluded.replica, "
                "expires_at = excluded.expires_at "
                f"WHERE {table}.expires_at < now() OR {table}.replica = excluded.replica "
                "RETURNING replica",
                (name, self.replica, self.ttl if ttl is None else ttl),
            ).fetchone()
        return row is not None

    def renew(self, name: str, table: str = "job_leases") -> bool:
        column = "job_id" if table == "job_leases" else "slug"
        with self.db.connection() as conn:
            row = conn.execute(
                f"UPDATE {table} SET expires_at = now() + make_interval(secs => %s) "
                f"WHERE {column} = %s AND replica = %s RETURNING 1",
                (self.ttl, name, self.replica),
            ).fetchone()
        return row is not None

    def hold(self, name: str) -> None:
        """Renew, or raise LeaseLost: called before a job's chunk is made durable."""
        if not self.renew(name):
            raise LeaseLost(name)

    def release(self, name: str, table: str = "job_leases") -> None:
        column = "job_id" if table == "job_leases" else "slug"
        with self.db.connection() as conn:
            conn.execute(
                f"DELETE FROM {table} WHERE {column} = %s AND replica = %s", (name, self.replica)
            )
