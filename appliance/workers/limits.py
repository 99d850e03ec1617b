"""Rate limits and quota spend that stay exact when several worker processes serve one box
(server.workers > 1 without [cluster]).

Both keep their state in SQLite in data_dir and make each decision in one `BEGIN IMMEDIATE`
transaction: SQLite takes its write lock at BEGIN, so the read (bucket level, spend), the
check and the write happen while no other process can write in between. That is the same
check-and-take the in-memory versions get from running on one event loop, made atomic
across processes. A decision is a few tens of microseconds, so it runs on the event loop
like the in-memory one (a thread hop would cost more than the transaction).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from appliance.errors import RateLimited
from appliance.gateway.ratelimit import Clock, LimitState, RateLimiter, TokenBucket
from appliance.gateway.usage import ADD_SPEND, SPEND_TABLE, UsageLog, quota_exhausted

BUSY_TIMEOUT_MS = 5000

LIMITS_SCHEMA = """
CREATE TABLE IF NOT EXISTS buckets (
    key_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    lim REAL NOT NULL,
    level REAL NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (key_id, kind)
) WITHOUT ROWID;
"""


def connect(path: Path, *, durable: bool) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are begun by hand: BEGIN IMMEDIATE),
    WAL so that readers never wait for the writer, and a busy timeout so that a process
    waits its turn for the write lock instead of failing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
    )
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode=WAL")
    # Limits need no durability (a bucket lost in a power cut refills within a minute);
    # spend keeps the usage log's own setting: a commit survives kill -9.
    conn.execute(f"PRAGMA synchronous={'NORMAL' if durable else 'OFF'}")
    return conn


@contextlib.contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction, its lock taken at BEGIN; rolled back if the body raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class SqliteRateLimiter(RateLimiter):
    """RateLimiter's token buckets, kept in SQLite so that every worker process draws from
    the same ones. Each public call loads the key's two buckets inside its transaction,
    lets RateLimiter's own arithmetic decide (so semantics and headers are the same), and
    writes them back before COMMIT, a refusal included (its refill, and in aadmit_charge the
    request it took, are kept exactly as the in-memory limiter keeps them)."""

    def __init__(self, path: Path, clock: Clock = time.time) -> None:
        super().__init__(clock)
        self.path = path
        self._conn = connect(path, durable=False)
        self._conn.executescript(LIMITS_SCHEMA)
        # One connection per process; the lock keeps threads (a job's settle, the event
        # loop) from interleaving statements of two transactions on it.
        self._lock = threading.RLock()
        self._depth = 0

    @contextlib.contextmanager
    def _decision(self, key_id: str) -> Iterator[None]:
        with self._lock:
            if self._depth:  # state() or admit_* called from inside another: one transaction
                yield
                return
            self._depth += 1
            refused: RateLimited | None = None
            try:
                with immediate(self._conn) as conn:
                    rows = conn.execute(
                        "SELECT kind, lim, level, updated FROM buckets WHERE key_id = ?",
                        (key_id,),
                    ).fetchall()
                    # RateLimiter reads and changes self._buckets: give it this key's
                    # buckets as the database has them now, nothing older.
                    self._buckets = {
                        (key_id, kind): TokenBucket(lim, level, updated)
                        for kind, lim, level, updated in rows
                    }
                    try:
                        yield
                    except RateLimited as exc:
                        # Committed as the in-memory limiter keeps it: a request refused for
                        # its tokens has still taken its request (aadmit_charge).
                        refused = exc
                    self._save(conn)
            finally:
                self._depth -= 1
                self._buckets = {}
            if refused is not None:
                raise refused

    def _save(self, conn: sqlite3.Connection) -> None:
        conn.executemany(
            "INSERT INTO buckets (key_id, kind, lim, level, updated) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (key_id, kind) DO UPDATE SET "
            "lim = excluded.lim, level = excluded.level, updated = excluded.updated",
            [(k, kind, b.limit, b.level, b.updated) for (k, kind), b in self._buckets.items()],
        )

    def admit_request(self, key_id: str, rpm: int, tpm: int) -> LimitState:
        with self._decision(key_id):
            return super().admit_request(key_id, rpm, tpm)

    def admit_tokens(self, key_id: str, rpm: int, tpm: int, tokens: int) -> LimitState:
        with self._decision(key_id):
            return super().admit_tokens(key_id, rpm, tpm, tokens)

    async def aadmit_charge(
        self,
        key_id: str,
        rpm: int,
        tpm: int,
        tokens: int,
        fetch: list[str],
        costs: list[int],
    ) -> tuple[LimitState, list[bytes | None], int]:
        # The request and its tokens in one transaction. RateLimiter's version never
        # suspends (no await inside), so the lock is not held across a switch of tasks.
        with self._decision(key_id):
            return await super().aadmit_charge(key_id, rpm, tpm, tokens, fetch, costs)

    def settle_tokens(self, key_id: str, tpm: int, delta: int) -> None:
        if delta:
            with self._decision(key_id):
                super().settle_tokens(key_id, tpm, delta)

    def state(self, key_id: str, rpm: int, tpm: int) -> LimitState:
        with self._decision(key_id):
            return super().state(key_id, rpm, tpm)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class SharedUsageLog(UsageLog):
    """The usage log whose quota spend is counted across processes: reserve reads, checks
    and adds in one BEGIN IMMEDIATE transaction on usage.db's spend table (the in-memory
    dict of UsageLog would let N workers each spend the whole quota)."""

    _spend_tx: sqlite3.Connection | None = None

    def start(self) -> None:
        super().start()
        if self._spend_tx is None:
            self._spend_tx = connect(self.path, durable=True)

    def stop(self) -> None:
        super().stop()
        if self._spend_tx is not None:
            with self._lock:
                self._spend_tx.close()
                self._spend_tx = None

    def _tx(self) -> sqlite3.Connection:
        conn = self._spend_tx
        if conn is None:  # before start / after stop: open on demand (tests, CLI)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = self._spend_tx = connect(self.path, durable=True)
            conn.execute(SPEND_TABLE)
        return conn

    def spent(self, key_id: str) -> int:
        with self._lock:
            row = (
                self._tx()
                .execute("SELECT tokens FROM spend WHERE key_id = ?", (key_id,))
                .fetchone()
            )
        return int(row[0]) if row else 0

    def reserve(self, key_id: str, quota: int | None, tokens: int) -> None:
        if quota is None:  # nothing to enforce: added with the writer's next batch
            self._defer(key_id, tokens)
            return
        with self._lock, immediate(self._tx()) as conn:
            row = conn.execute("SELECT tokens FROM spend WHERE key_id = ?", (key_id,)).fetchone()
            spent = int(row[0]) if row else 0
            if spent + tokens > quota:
                raise quota_exhausted(spent, quota, tokens)
            self._add(conn, key_id, tokens)

    def refund(self, key_id: str, tokens: int, quota: int | None = None) -> None:
        if tokens:
            with self._lock, immediate(self._tx()) as conn:
                self._add(conn, key_id, -tokens)

    @staticmethod
    def _add(conn: sqlite3.Connection, key_id: str, tokens: int) -> None:
        conn.execute(ADD_SPEND, (key_id, tokens))
