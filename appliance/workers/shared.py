"""The single box's backends made safe for several worker processes (server.workers > 1, no
[cluster]). They implement the interfaces the cluster backends do (leases, grants, secrets,
events), so the job runner, uploads and the console take the same paths as across
replicas, with data_dir standing in for PostgreSQL and Redis:

- limits and quota spend: SQLite transactions (appliance.workers.limits);
- keys, saved classifiers and pipelines: their JSON files, re-read when they change,
  written under a file lock;
- job and build leases: an flock on a file per job, held while it runs; the kernel drops it
  when its process dies, so another worker takes the job over at its next round;
- upload grants and shared secrets: a small SQLite database (workers.db);
- model changes: a marker file each worker polls (one stat), so an upload or delete on one
  worker is applied by the others at once rather than at their next models_dir scan.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.backends import Backends
from appliance.classifiers import ClassifierStore
from appliance.config import Settings
from appliance.gateway.keys import KeyStore, hash_secret
from appliance.pipelines import LocalPipelineStore
from appliance.workers.limits import SharedUsageLog, SqliteRateLimiter, connect, immediate

log = logging.getLogger("appliance.workers")

EVENT_POLL_SECONDS = 0.25


def state_dir(settings: Settings) -> Path:
    """Where the workers keep what they share beside the single box's own files."""
    return settings.data_path / "workers"


class SqliteShared:
    """Upload grants and shared secrets in data_dir/workers/workers.db."""

    def __init__(self, path: Path) -> None:
        self._conn = connect(path, durable=True)
        self._conn.executescript(
            "CREATE TABLE IF NOT EXISTS upload_grants (token_hash TEXT PRIMARY KEY, "
            "slug TEXT NOT NULL, task TEXT, expires_at REAL NOT NULL);"
            "CREATE TABLE IF NOT EXISTS secrets (name TEXT PRIMARY KEY, value TEXT NOT NULL);"
        )
        self._lock = threading.Lock()

    # ---- grants (the PgGrants interface) ---------------------------------------------------
    def put(self, token: str, slug: str, task: str | None, expires: float) -> None:
        with self._lock, immediate(self._conn) as conn:
            conn.execute("DELETE FROM upload_grants WHERE expires_at < ?", (time.time(),))
            conn.execute(
                "INSERT INTO upload_grants (token_hash, slug, task, expires_at) "
                "VALUES (?, ?, ?, ?)",
                (hash_secret(token), slug, task, expires),
            )

    def take(self, token: str) -> tuple[Any, ...] | None:
        """(slug, task, expires) of an unexpired grant, deleted in the same statement: a URL
        works once even when two workers receive it at once."""
        with self._lock, immediate(self._conn) as conn:
            return conn.execute(
                "DELETE FROM upload_grants WHERE token_hash = ? AND expires_at >= ? "
                "RETURNING slug, task, expires_at",
                (hash_secret(token), time.time()),
            ).fetchone()

    # ---- secrets (the SharedSecrets interface) ---------------------------------------------
    def get(self, name: str) -> bytes:
        """The secret `name`, made by whichever worker asks first (INSERT OR IGNORE, then a
        read, in one transaction: workers starting together agree on one value)."""
        with self._lock, immediate(self._conn) as conn:
            conn.execute(
                "INSERT OR IGNORE INTO secrets (name, value) VALUES (?, ?)",
                (name, secrets.token_bytes(32).hex()),
            )
            row = conn.execute("SELECT value FROM secrets WHERE name = ?", (name,)).fetchone()
        return bytes.fromhex(row[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class FileLeases:
    """The cluster Leases interface over flock: a lease is an exclusive lock on
    locks/<table>-<name>.lock, held by this process until released. No TTL is needed: the
    kernel releases the lock of a process that dies, however it dies."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def _path(self, name: str, table: str) -> Path:
        return self.folder / f"{table}-{_UNSAFE.sub('_', name)}.lock"

    def acquire(self, name: str, table: str = "job_leases", ttl: float | None = None) -> bool:
        path = self._path(name, table)
        with self._lock:
            if str(path) in self._held:  # held here already (as Leases: same replica wins)
                return True
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            self._held[str(path)] = fd
            return True

    def renew(self, name: str, table: str = "job_leases") -> bool:
        with self._lock:
            return str(self._path(name, table)) in self._held

    def hold(self, name: str) -> None:
        from appliance.cluster.leases import LeaseLost

        if not self.renew(name):
            raise LeaseLost(name)

    def release(self, name: str, table: str = "job_leases") -> None:
        with self._lock:
            fd = self._held.pop(str(self._path(name, table)), None)
            if fd is not None:
                os.close(fd)  # closing the only descriptor drops the flock

    def close(self) -> None:
        with self._lock:
            for fd in self._held.values():
                os.close(fd)
            self._held.clear()


class FileEvents:
    """The cluster Events interface over marker files: publish writes events/<kind>.json
    (atomically, naming its publisher); a thread stats the markers every
    EVENT_POLL_SECONDS and hands a changed one, written by another process, to the
    handlers. Two publishes between polls are seen as the last one: handlers rescan, so
    they need only know that something changed."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._handlers: dict[str, list[Callable[[dict[str, str]], None]]] = {}
        self._seen: dict[str, tuple[int, int] | None] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.origin = f"{os.getpid()}-{secrets.token_hex(4)}"  # who published a message

    def on(self, kind: str, handler: Callable[[dict[str, str]], None]) -> None:
        self._handlers.setdefault(kind, []).append(handler)
        self._seen.setdefault(kind, self._stamp(kind))

    def publish(self, kind: str, **fields: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{kind}.json"
        tmp = path.with_name(f".{kind}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**fields, "origin": self.origin}))
        os.replace(tmp, path)
        self._seen[kind] = self._stamp(kind)  # our own change: not news to us

    def _stamp(self, kind: str) -> tuple[int, int] | None:
        try:
            st = (self.folder / f"{kind}.json").stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns)

    def poll(self) -> None:
        """One round: hand changed markers to their handlers."""
        for kind, handlers in self._handlers.items():
            stamp = self._stamp(kind)
            if stamp is None or stamp == self._seen.get(kind):
                continue
            self._seen[kind] = stamp
            try:
                message = json.loads((self.folder / f"{kind}.json").read_text())
            except (OSError, ValueError):
                message = {}  # replaced as we read: rescan anyway
            if message.get("origin") == self.origin:
                continue
            for handler in handlers:
                try:
                    handler(message)
                except Exception:
                    log.exception("event handler for %s failed", kind)

    def _run(self) -> None:
        while not self._stop.wait(EVENT_POLL_SECONDS):
            self.poll()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="worker-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None


def open_worker_backends(settings: Settings) -> Backends:
    """The single box's backends, each safe across server.workers processes."""
    folder = state_dir(settings)
    usage = settings.usage
    limiter = SqliteRateLimiter(folder / "limits.db")
    shared = SqliteShared(folder / "workers.db")
    leases = FileLeases(folder / "locks")
    return Backends(
        keys=KeyStore(settings.keys_path),  # re-reads keys.json on any change
        limiter=limiter,
        usage=SharedUsageLog(settings.usage_path, retention_days=usage.retention_days),
        classifiers=ClassifierStore(
            settings.data_path / "classifiers.json",
            max_per_key=settings.classifiers.max_per_key,
            shared=True,
        ),
        pipelines=LocalPipelineStore(
            settings.data_path / "pipelines.json",
            max_per_key=settings.pipelines.max_per_key,
            shared=True,
        ),
        events=FileEvents(folder / "events"),
        leases=leases,
        closers=[limiter.close, shared.close, leases.close],
        secrets=shared,
        grants=shared,
        workers=settings.server.workers,
    )
