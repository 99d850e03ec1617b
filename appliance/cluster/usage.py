"""Usage records, request logs and durable quota spend in PostgreSQL.

The request path never waits for PostgreSQL: records queue in memory and one writer thread
inserts them in batches. PostgreSQL down, they wait (up to `max_pending`; past it a record is
dropped, logged and counted, exactly as the single box does when its disk lags) and are
written when it is back. Quota decisions are Redis's (appliance.cluster.limits.RedisSpend);
this log adds each charge to the durable total in PostgreSQL, also written behind."""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from typing import Any

from appliance.cluster.database import Database
from appliance.cluster.limits import RedisSpend
from appliance.errors import BackendUnavailable
from appliance.gateway.usage import Record, UsageLog, log_filter, log_rows, usage_rows

log = logging.getLogger("appliance.usage")

FLUSH_SECONDS = 0.25
BATCH = 1000


class ClusterUsageLog(UsageLog):
    """The UsageLog interface, on PostgreSQL (+ Redis for quotas). A subclass only so that
    handlers typed with UsageLog take it; it shares no state or code with the SQLite log."""

    def __init__(
        self,
        db: Database,
        spend: RedisSpend | None,
        *,
        replica: str,
        retention_days: float,
        max_pending: int = 100_000,
    ) -> None:
        self.db = db
        self.spend_counter = spend
        self.replica = replica
        self.retention_s = retention_days * 86400
        self.max_pending = max_pending
        self._pending: collections.deque[Record] = collections.deque()
        self._spend_delta: dict[str, int] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.dropped = 0

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._writer, name="usage-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what waits (for at most `timeout` s if PostgreSQL is down), then stop."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout + 1)
            self._thread = None
        if self._pending or self._spend_delta:
            log.error(
                "stopped with %d usage records and %d spend changes unwritten (PostgreSQL down)",
                len(self._pending),
                len(self._spend_delta),
            )

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _writer(self) -> None:
        last_prune = 0.0
        deadline: float | None = None
        while True:
            self._wake.wait(FLUSH_SECONDS)
            self._wake.clear()
            if self._stopping and deadline is None:
                deadline = time.monotonic() + 10
            try:
                self._flush()
                if time.time() - last_prune > 3600:
                    with self.db.connection() as conn:
                        conn.execute(
                            "DELETE FROM requests WHERE ts < %s", (time.time() - self.retention_s,)
                        )
                    last_prune = time.time()
            except BackendUnavailable:
                time.sleep(0.5)  # kept in memory; written once PostgreSQL answers
            except Exception:
                log.exception("usage write failed; retrying")
                time.sleep(0.5)
            if self._stopping and (
                (not self._pending and not self._spend_delta) or time.monotonic() > deadline  # type: ignore[operator]
            ):
                return

    def _flush(self) -> None:
        with self._lock:
            delta, self._spend_delta = self._spend_delta, {}
        try:
            if delta:
                with self.db.connection() as conn, conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO spend (key_id, tokens) VALUES (%s, %s) ON CONFLICT "
                        "(key_id) DO UPDATE SET tokens = spend.tokens + excluded.tokens",
                        list(delta.items()),
                    )
        except BaseException:
            with self._lock:  # put it back for the next try
                for key_id, tokens in delta.items():
                    self._spend_delta[key_id] = self._spend_delta.get(key_id, 0) + tokens
            raise
        while self._pending:
            batch = [self._pending[i] for i in range(min(BATCH, len(self._pending)))]
            with (
                self.db.connection() as conn,
                conn.cursor() as cur,
                cur.copy(
                    "COPY requests (ts, key_id, endpoint, model, status, latency_ms, tokens, "
                    "cached, request_id, replica) FROM STDIN"
                ) as copy,
            ):
                for r in batch:
                    copy.write_row((*r, self.replica))
            for _ in batch:  # written: only now may they leave memory
                self._pending.popleft()

    # ---- request path (never blocks) -----------------------------------------------------
    def record(self, record: Record) -> None:
        if len(self._pending) >= self.max_pending:
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.warning("usage records waiting for PostgreSQL: %d dropped", self.dropped)
            return
        self._pending.append(record)

    # ---- quotas --------------------------------------------------------------------------
    def durable_spent(self, key_id: str) -> int:
        """The durable total plus this replica's changes not written yet."""
        with self.db.connection() as conn:
            row = conn.execute("SELECT tokens FROM spend WHERE key_id = %s", (key_id,)).fetchone()
        return (row[0] if row else 0) + self._spend_delta.get(key_id, 0)

    def spent(self, key_id: str) -> int:
        if self.spend_counter is not None:
            value = self.spend_counter.spent(key_id)
            if value is not None:
                return value
        return self.durable_spent(key_id)

    def _add(self, key_id: str, tokens: int) -> None:
        with self._lock:
            self._spend_delta[key_id] = self._spend_delta.get(key_id, 0) + tokens

    def reserve(self, key_id: str, quota: int | None, tokens: int) -> None:
        if tokens <= 0:
            return
        if self.spend_counter is not None and quota is not None:
            # Only a key with a quota needs Redis's atomic decision; without one the durable
            # total (written behind) is all there is to keep: no round trip on its requests.
            self.spend_counter.charge(key_id, quota, tokens)
        elif quota is not None and self.durable_spent(key_id) + tokens > quota:
            # Without Redis, PostgreSQL alone decides (not atomic across replicas).
            from appliance.errors import InsufficientBalance

            raise InsufficientBalance("Token quota exhausted.", details={"token_quota": quota})
        self._add(key_id, tokens)

    def refund(self, key_id: str, tokens: int, quota: int | None = None) -> None:
        if not tokens:
            return
        if self.spend_counter is not None and quota is not None:
            with contextlib.suppress(BackendUnavailable):  # the durable total still gets it
                self.spend_counter.charge(key_id, None, -tokens)
        self._add(key_id, -tokens)

    # ---- queries (blocking: run in a thread) ---------------------------------------------
    def usage(self, key_id: str | None, since: float, until: float) -> list[dict[str, Any]]:
        sql = (
            "SELECT to_char(to_timestamp(ts) AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, "
            "COALESCE(model, '') AS m, COUNT(*), SUM(tokens), SUM(cached::int) FROM requests "
            "WHERE ts >= %s AND ts < %s"
        )
        args: list[Any] = [since, until]
        if key_id is not None:
            sql += " AND key_id = %s"
            args.append(key_id)
        sql += " GROUP BY day, m ORDER BY day, m"
        with self.db.connection() as conn:
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
        where, args = log_filter("%s", key_id, status, model, since, until)
        sql = (
            "SELECT ts, key_id, endpoint, model, status, latency_ms, tokens, cached, request_id "
            f"FROM requests {where} ORDER BY ts DESC, id DESC LIMIT %s OFFSET %s"
        )
        with self.db.connection() as conn:
            rows = conn.execute(sql, [*args, limit, offset]).fetchall()
        return log_rows(rows)
