"""PostgreSQL: one small connection pool (psycopg 3) shared by the cluster stores.

psycopg rather than asyncpg: the stores are called from worker threads, the CLI and the
event loop alike, and psycopg has one API for all three (sync here; asyncpg is async only).
Every call is bounded in time: PostgreSQL down is a BackendUnavailable (503) within a couple
of seconds, never a request that hangs."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from appliance.cluster.health import BackendHealth
from appliance.cluster.migrations import LOCK_ID, MIGRATIONS
from appliance.errors import BackendUnavailable

log = logging.getLogger("appliance.cluster")

BACKEND = "postgres"


class Database:
    def __init__(self, url: str, health: BackendHealth, *, timeout: float = 2.0) -> None:
        self.url = url
        self.health = health
        self.timeout = timeout
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=4,
            open=False,
            timeout=timeout,
            kwargs={"autocommit": True, "connect_timeout": max(1, int(timeout))},
            # A connection that died with its server is noticed at checkout, not mid-query.
            check=ConnectionPool.check_connection,
            reconnect_timeout=0,  # keep trying for ever: the server may come back
        )
        health.watch(BACKEND)

    def open(self, *, wait: float = 30.0) -> None:
        """Connect and apply the migrations (several replicas may do so at once)."""
        self._pool.open(wait=True, timeout=wait)
        with self.connection() as conn:
            migrate(conn)

    def close(self) -> None:
        self._pool.close()

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection (autocommit; use `conn.transaction()` for several statements).
        Unreachable -> BackendUnavailable, and /readyz says so."""
        try:
            with self._pool.connection(timeout=self.timeout) as conn:
                yield conn
        except (psycopg.OperationalError, PoolTimeout) as exc:
            self.health.failed(BACKEND, exc)
            raise BackendUnavailable(
                "PostgreSQL is unreachable; retry shortly.",
                details={"backend": BACKEND},
                retry_after=2,
            ) from None
        else:
            self.health.ok(BACKEND)


def migrate(conn: psycopg.Connection[Any]) -> list[int]:
    """Apply the migrations this database lacks; returns their versions."""
    applied: list[int] = []
    conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_ID,))
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        for version, sql in MIGRATIONS:
            if version in done:
                continue
            with conn.transaction():
                conn.execute(sql)  # type: ignore[arg-type]
                conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
            log.info("database migrated to version %d", version)
            applied.append(version)
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_ID,))
    return applied
