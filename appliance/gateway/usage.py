"""Usage: every request recorded in an embedded SQLite database (WAL), written by one
background thread so that logging never fails or stalls a request (a full queue drops the
record: counted, logged, in /metrics); per-key token spend for quotas is kept in memory and
committed to its own table by the request itself, so neither a full queue nor kill -9 loses
it."""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

from appliance.errors import InsufficientBalance

log = logging.getLogger("appliance.usage")

SPEND_TABLE = "CREATE TABLE IF NOT EXISTS spend (key_id TEXT PRIMARY KEY, tokens INTEGER NOT NULL)"
"""Per-key token spend (quotas), in usage.db beside the request records."""
ADD_SPEND = (
    "INSERT INTO spend (key_id, tokens) VALUES (?, ?) "
    "ON CONFLICT(key_id) DO UPDATE SET tokens = tokens + excluded.tokens"
)

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    key_id TEXT,
    endpoint TEXT NOT NULL,
    model TEXT,
    status INTEGER NOT NULL,
    latency_ms REAL NOT NULL,
    tokens INTEGER NOT NULL,
    cached INTEGER NOT NULL,
    request_id TEXT
);
CREATE INDEX IF NOT EXISTS requests_key_ts ON requests (key_id, ts);
CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts);
{SPEND_TABLE};
"""


INSERT_REQUESTS = (
    "INSERT INTO requests (ts, key_id, endpoint, model, status, latency_ms, tokens, cached, "
    "request_id) VALUES "
)
ROW_PLACEHOLDERS = "(?, ?, ?, ?, ?, ?, ?, ?, ?)"
ROWS_PER_INSERT = 1024
"""9,216 parameters per statement, within SQLite's default limit of 32,766."""


@functools.cache
def _insert_of(rows: int) -> str:
    return INSERT_REQUESTS + ", ".join([ROW_PLACEHOLDERS] * rows)


class Record(NamedTuple):
    """One answered request, its fields in the `requests` table's column order: the writer
    hands records to SQLite as they are. A tuple rather than a frozen dataclass: one is made
    per request on the event loop, and the dataclass's __init__ showed in its profile."""

    ts: float
    key_id: str | None
    endpoint: str
    model: str | None
    status: int
    latency_ms: float
    tokens: int
    cached: bool
    request_id: str | None


def quota_exhausted(spent: int, quota: int, tokens: int) -> InsufficientBalance:
    """The 402 of a request whose `tokens` do not fit in what is left of `quota`."""
    return InsufficientBalance(
        f"Token quota exhausted: {spent} of {quota} tokens spent; this request needs {tokens}.",
        details={"token_quota": quota, "spent": int(spent), "needed": tokens},
    )


def usage_rows(rows: list[Any]) -> list[dict[str, Any]]:
    """(day, model, requests, tokens, cached) rows as /v1/usage answers them (both logs)."""
    return [
        {
            "date": d,
            "model": m or None,
            "requests": n,
            "tokens": int(t or 0),
            "cached_requests": int(c or 0),
        }
        for d, m, n, t, c in rows
    ]


def log_filter(
    mark: str,
    key_id: str | None,
    status: int | None,
    model: str | None,
    since: float | None,
    until: float | None,
) -> tuple[str, list[Any]]:
    """The WHERE clause of a /v1/logs query and its arguments; `mark` is the driver's
    placeholder (? for SQLite, %s for PostgreSQL)."""
    clauses, args = [], []
    for column, value in (("key_id", key_id), ("status", status), ("model", model)):
        if value is not None:
            clauses.append(f"{column} = {mark}")
            args.append(value)
    if since is not None:
        clauses.append(f"ts >= {mark}")
        args.append(since)
    if until is not None:
        clauses.append(f"ts < {mark}")
        args.append(until)
    return (f"WHERE {' AND '.join(clauses)}" if clauses else ""), args


def log_rows(rows: list[Any]) -> list[dict[str, Any]]:
    """(ts, key_id, endpoint, model, status, latency, tokens, cached, request id) rows as
    /v1/logs answers them."""
    return [
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)),
            "key_id": k,
            "endpoint": e,
            "model": m,
            "status": s,
            "latency_ms": round(lat, 2),
            "tokens": t,
            "cached": bool(c),
            "request_id": rid,
        }
        for ts, k, e, m, s, lat, t, c, rid in rows
    ]


WRITE_INTERVAL = 0.05
"""Seconds between the writer's batches of request records."""


class UsageLog:
    def __init__(self, path: Path, *, retention_days: float, max_pending: int = 100_000) -> None:
        self.path = path
        self.retention_s = retention_days * 86400
        self.max_pending = max_pending
        # Records wait in a deque the writer drains every WRITE_INTERVAL: a queue.Queue woke
        # the writer for every record, and its wake-ups and GIL hand-offs were a third of the
        # process's CPU under cache-hit load (py-spy, c=8).
        self._pending: collections.deque[Record] = collections.deque()
        self._appended = 0  # records accepted so far (event loop); the writer counts _done
        self._done = 0
        self._progress = threading.Condition()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._spent: dict[str, int] = {}
        self._deferred: dict[str, int] = {}  # spend of keys without a quota, for the writer
        self._lock = threading.Lock()
        # Spend is written by the request path itself, not the queue: a full queue or a
        # kill -9 must not lose what quotas count (see _charge).
        self._spend_conn: sqlite3.Connection | None = None
        self.dropped = 0

    # ---- lifecycle -----------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=5, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect()
        conn.executescript(SCHEMA)
        self._spent = dict(conn.execute("SELECT key_id, tokens FROM spend").fetchall())
        conn.close()
        self._spend_conn = self._connect()
        self._thread = threading.Thread(target=self._writer, name="usage-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Flush what is queued, then stop the writer."""
        if self._thread is not None:
            self._stopping = True
            self._wake.set()
            self._thread.join(timeout=30)
            self._thread = None
        if self._spend_conn is not None:
            with self._lock:
                self._spend_conn.close()
                self._spend_conn = None

    def _writer(self) -> None:
        conn = self._connect()
        last_prune = 0.0
        while True:
            self._wake.wait(WRITE_INTERVAL)
            self._wake.clear()
            stopping = self._stopping
            batch: list[Record] = []
            while self._pending and len(batch) < 5000:
                batch.append(self._pending.popleft())
            with self._lock:
                deferred, self._deferred = self._deferred, {}
            try:
                if deferred:
                    conn.executemany(ADD_SPEND, list(deferred.items()))
                    conn.commit()
                self._write(conn, batch)
                if time.time() - last_prune > 3600:
                    last_prune = time.time()
                    conn.execute(
                        "DELETE FROM requests WHERE ts < ?", (time.time() - self.retention_s,)
                    )
                    conn.commit()
            except sqlite3.Error as exc:
                log.warning("usage write failed (%d records lost): %s", len(batch), exc)
            with self._progress:
                self._done += len(batch)
                self._progress.notify_all()
            if self._pending:
                self._wake.set()  # more than one batch waits: go on at once
            elif stopping:
                break
        conn.close()

    @staticmethod
    def _write(conn: sqlite3.Connection, batch: list[Record]) -> None:
        # One INSERT of many rows, not executemany: executemany lets the GIL go and takes it
        # back for every row, and beside a busy event loop each of those hand-offs cost more
        # than the row (27 vs 8 us of writer CPU per record at 4,500 cached answers/s).
        # Statements of ROWS_PER_INSERT rows, then of powers of two: a few SQL texts, each
        # prepared once and kept in the connection's statement cache.
        start = 0
        while start < len(batch):
            left = len(batch) - start
            size = ROWS_PER_INSERT if left >= ROWS_PER_INSERT else 1 << (left.bit_length() - 1)
            conn.execute(
                _insert_of(size), list(itertools.chain.from_iterable(batch[start : start + size]))
            )
            start += size
        conn.commit()

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until the records accepted so far are written (a reader sees its writes)."""
        if self._thread is None:
            return
        target = self._appended
        self._wake.set()
        with self._progress:
            self._progress.wait_for(lambda: self._done >= target, timeout)

    # ---- request path (never blocks) -----------------------------------------------------
    def record(self, record: Record) -> None:
        # Called on the event loop: waiting for room would stall every request. Full means
        # the disk lags by max_pending records; the record is dropped and counted
        # (appliance_usage_records_dropped_total). Quota spend never goes this way.
        if len(self._pending) < self.max_pending:
            self._pending.append(record)
            self._appended += 1
        else:
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.warning("usage log queue full: %d records dropped so far", self.dropped)

    # ---- quotas --------------------------------------------------------------------------
    def spent(self, key_id: str) -> int:
        return self._spent.get(key_id, 0)

    def reserve(self, key_id: str, quota: int | None, tokens: int) -> None:
        """Count tokens against the key's quota before they are used; 402 if they do not fit."""
        if quota is None:
            self._defer(key_id, tokens)
            return
        with self._lock:
            spent = self._spent.get(key_id, 0)
            if spent + tokens > quota:
                raise quota_exhausted(spent, quota, tokens)
            self._spent[key_id] = spent + tokens
            self._charge(key_id, tokens)

    def _defer(self, key_id: str, tokens: int) -> None:
        """The spend of a key without a quota: counted at once, committed by the writer with
        its next batch of records. Nothing is enforced on it, and a commit per request was a
        fourteenth of the event loop's time under c=32 load (py-spy); a crash can lose the
        last WRITE_INTERVAL of it, as of the request records."""
        if not tokens:
            return
        with self._lock:
            self._spent[key_id] = self._spent.get(key_id, 0) + tokens
            self._deferred[key_id] = self._deferred.get(key_id, 0) + tokens

    def refund(self, key_id: str, tokens: int, quota: int | None = None) -> None:
        """Give back `tokens` (`quota`: the key's, which the cluster log needs to know whether
        Redis counts this key; here every key's spend is counted)."""
        with self._lock:
            self._spent[key_id] = self._spent.get(key_id, 0) - tokens
            self._charge(key_id, -tokens)

    def _charge(self, key_id: str, tokens: int) -> None:
        """Commit a spend change before the request goes on. WAL with synchronous=NORMAL: a
        commit survives kill -9 of the process (it is in the OS's page cache), only a power
        loss can undo the last moments. One small transaction, tens of microseconds."""
        if self._spend_conn is None or not tokens:
            return
        try:
            self._spend_conn.execute(ADD_SPEND, (key_id, tokens))
            self._spend_conn.commit()
        except sqlite3.Error as exc:  # the in-memory count still holds the quota this run
            log.warning("spend write failed for %s: %s", key_id, exc)

    # ---- queries (blocking: run in a thread) ---------------------------------------------
    def usage(self, key_id: str | None, since: float, until: float) -> list[dict[str, Any]]:
        sql = (
            "SELECT date(ts, 'unixepoch') AS day, COALESCE(model, '') AS model, COUNT(*), "
            "SUM(tokens), SUM(cached) FROM requests WHERE ts >= ? AND ts < ?"
        )
        args: list[Any] = [since, until]
        if key_id is not None:
            sql += " AND key_id = ?"
            args.append(key_id)
        sql += " GROUP BY day, model ORDER BY day, model"
        self.flush()
        with self._reader() as conn:
            rows = conn.execute(sql, args).fetchall()
        return usage_rows(rows)

    def logs(
        self,
        *,
        key_id: str | None,
        status: int | None,
        model: str | None,
        since: float | None,
        until: float | None,
        limit: int,
        offset: int,
    ) -> list[dict[str, Any]]:
        where, args = log_filter("?", key_id, status, model, since, until)
        sql = (
            "SELECT ts, key_id, endpoint, model, status, latency_ms, tokens, cached, request_id "
            f"FROM requests {where} ORDER BY id DESC LIMIT ? OFFSET ?"
        )
        self.flush()
        with self._reader() as conn:
            rows = conn.execute(sql, [*args, limit, offset]).fetchall()
        return log_rows(rows)

    def _reader(self) -> contextlib.closing[sqlite3.Connection]:
        return contextlib.closing(sqlite3.connect(self.path, timeout=5))
