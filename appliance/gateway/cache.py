"""The disk response cache (diskcache; msgpack blobs on disk, never pickle).

Keyed per item by model slug, the model files' fingerprint (a re-exported model never serves
stale answers), task, the normalised input and the parameters that change the output.
Every failure (a corrupt file, a full disk) degrades to a MISS with a logged warning: the
cache may make a request faster, never make it fail.

Writes are behind: `set_many` only queues the encoded entries (readable at once by
`get_many`), and one writer thread commits whatever queued meanwhile in one SQLite
transaction. Under load that is one commit for many requests instead of one per request, and
no request waits for the disk. Reads go to memory first (the entries used last, and those
queued), then to one indexed SQLite lookup per key (WAL: never blocked by the writer),
which a Bloom filter of the keys on disk skips for most misses. `flush` (and `close`) wait
for queued writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import diskcache
import msgspec
import numpy as np

log = logging.getLogger("appliance.cache")


class _Entry(msgspec.Struct, array_like=True):
    output: dict[str, Any]
    truncated: bool
    created: float


@dataclass(frozen=True, slots=True)
class Hit:
    output: dict[str, Any]
    truncated: bool
    created: float


def _plain(value: Any) -> Any:
    """Parsed inputs are often dataclasses; key them by their fields."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"type": type(value).__name__, **dataclasses.asdict(value)}
    if isinstance(value, np.ndarray):
        return {"dtype": str(value.dtype), "shape": list(value.shape), "data": value.tolist()}
    raise TypeError(f"cannot key a cache entry on {type(value).__name__}")


_sorted_json = msgspec.json.Encoder(order="sorted").encode


def cache_key(slug: str, fingerprint: str, task: str, item: Any, params: dict[str, Any]) -> str:
    fields = {"model": slug, "files": fingerprint, "task": task, "input": item, "params": params}
    if isinstance(item, str):
        # A text, the common case: msgspec encodes it a quarter as costly as json.dumps.
        # Anything else keeps json.dumps, whose hook keys a parsed input by its type's name
        # too (msgspec would encode a dataclass by its fields alone).
        return hashlib.sha256(_sorted_json(fields)).hexdigest()
    blob = json.dumps(
        fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_plain
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class SharedCache(Protocol):
    """A second cache level shared by replicas: the same keys and encoded entries."""

    def get_many(self, keys: list[str]) -> dict[str, bytes]: ...

    def names(self, keys: list[str]) -> list[str]: ...

    def set_many(self, blobs: dict[str, bytes], ttl: float) -> None: ...


MAX_QUEUED = 10_000
"""Entries waiting for the writer, at most; past it new answers go uncached (a stuck disk)."""

WRITE_INTERVAL = 0.05
"""Seconds the writer gathers answers for before it commits them in one transaction (this
process reads them at once; other workers and replicas see them that much later)."""


class _Memory:
    """The encoded entries read or written last, up to a byte budget (least recently used
    go first): a repeat is answered without the SQLite lookup, a third of a cached answer's
    cost. Entries never change under a key (the key holds the model files' fingerprint),
    so worker processes each keeping their own copy agree; expiry is checked on decode."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.size = 0
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()  # big batches read the cache from worker threads

    def get(self, key: str) -> bytes | None:
        with self._lock:
            blob = self._entries.get(key)
            if blob is not None:
                self._entries.move_to_end(key)
            return blob

    def put(self, key: str, blob: bytes) -> None:
        if len(blob) > self.limit:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.size -= len(old)
            self._entries[key] = blob
            self.size += len(blob)
            while self.size > self.limit:
                _, dropped = self._entries.popitem(last=False)
                self.size -= len(dropped)


KEY_FILTER_HASHES = 7
"""Bits set per key in the key filter: about 1% false positives at 10 bits per key."""

KEY_READ_ROWS = 1000
"""Keys read from the disk's table in one statement on the event loop, at most (~2 ms);
the first read of all of them, off the loop, takes ten times as many per statement."""

KEY_FILTER_SYNC_SECONDS = 0.05
"""At most this often, a lookup first reads the keys other processes (server.workers) have
committed since the last look, so that their answers are found here too."""


class _KeyFilter:
    """Which keys the disk may hold: a Bloom filter, its bits taken from the key itself (a
    cache key is a SHA-256 digest, already uniform). A miss it rules out skips the SQLite
    lookup, which cost ~85 us of event-loop CPU per cache miss at c=32 (the lookup lets the
    GIL go and takes it back beside the busy model threads) against ~2 us here. It never
    rules out a key that is on disk once it is `ready`; a key it cannot rule out that is not
    there (evicted, expired, a false positive) costs the lookup it always did. Until the
    keys already on disk are read in (by the writer thread, at start), it rules out
    nothing."""

    def __init__(self, expected_keys: int) -> None:
        self._log2 = min(27, max(16, (10 * max(1, expected_keys) - 1).bit_length()))
        self._mask = (1 << self._log2) - 1
        self._bits = bytearray(1 << (self._log2 - 3))
        self._lock = threading.Lock()  # `add` is a read-modify-write of a byte
        self.ready = False

    def _positions(self, key: str) -> list[int]:
        try:
            value = int(key, 16) if len(key) == 64 else None
        except ValueError:
            value = None
        if value is None:  # not a digest (tests, other callers): hash it first
            value = int.from_bytes(hashlib.sha256(key.encode()).digest(), "big")
        step, mask = self._log2, self._mask
        return [(value >> (step * i)) & mask for i in range(KEY_FILTER_HASHES)]

    def _set(self, bits: bytearray, keys: Iterable[str]) -> None:
        for key in keys:
            for p in self._positions(key):
                bits[p >> 3] |= 1 << (p & 7)

    def add(self, keys: Iterable[str]) -> None:
        with self._lock:
            self._set(self._bits, keys)

    def load(self, keys: Iterable[str]) -> None:
        """The keys already on disk (off the event loop: a big cache holds millions): set in
        a copy, merged with what `add` set meanwhile, then the filter starts ruling out."""
        bits = bytearray(len(self._bits))
        self._set(bits, keys)
        with self._lock:
            merged = np.frombuffer(bits, np.uint8)
            np.bitwise_or(merged, np.frombuffer(self._bits, np.uint8), out=merged)
            self._bits = bits
            self.ready = True

    def may_hold(self, key: str) -> bool:
        if not self.ready:
            return True
        bits = self._bits
        return all(bits[p >> 3] >> (p & 7) & 1 for p in self._positions(key))


KEY_LOG_ROWS = 100_000
"""Keys the disk's key log keeps for other processes to read (~8 MB); a process further
behind (idle while the others inserted that many) reads every key on disk again."""

_KEY_LOG = (
    "CREATE TABLE IF NOT EXISTS appliance_key_log"
    " (seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL)",
    "CREATE TRIGGER IF NOT EXISTS appliance_key_logged AFTER INSERT ON Cache"
    " WHEN new.raw AND typeof(new.key) = 'text'"
    " BEGIN INSERT INTO appliance_key_log (key) VALUES (new.key); END",
)


class _DiskKeys:
    """The keys committed to the disk cache, put into the key filter: every key once (a scan
    of diskcache's table), then those inserted since, by this process or another one sharing
    the directory, from a log an SQLite trigger fills in the inserting transaction: commit
    order, numbered by AUTOINCREMENT, which never gives a number twice. (The table's own
    rowids do: a row inserted after the highest ones were deleted, by expiry or eviction,
    takes their rowid again, behind where a reader stopped.) Reads are bounded, so neither
    a big cache nor a long backlog is ever held in memory or read on the event loop at once.
    `lost`: the log was pruned past keys this process had not read; it must scan again."""

    def __init__(self, path: Path, known: _KeyFilter) -> None:
        # Autocommit: reads see every commit (WAL: they never wait for a writer); the
        # trigger's creation and the pruning are writes, made from the writer thread.
        self._connection = sqlite3.connect(
            path, timeout=5, check_same_thread=False, isolation_level=None
        )
        self._known = known
        self._seen = 0  # the last log entry read
        self._lock = threading.Lock()
        self._synced = 0.0
        self.lost = False
        with self._lock:
            for statement in _KEY_LOG:
                self._connection.execute(statement)

    def load(self) -> None:
        """Every key on disk into the filter (in the writer thread: a big cache holds
        millions), then the log from where it stood before the scan began."""
        with self._lock:
            self._known.ready = False  # until the scan is in: every miss looked up on disk
            (last,) = self._connection.execute(
                "SELECT coalesce(max(seq), 0) FROM appliance_key_log"
            ).fetchone()
            self._seen, self._synced, self.lost = last, 0.0, False
        self._known.load(self._scan())

    def _scan(self) -> Iterator[str]:
        rowid, size = 0, 10 * KEY_READ_ROWS
        while True:
            with self._lock:
                rows = self._connection.execute(
                    "SELECT rowid, key FROM Cache WHERE rowid > ? AND raw ORDER BY rowid LIMIT ?",
                    (rowid, size),
                ).fetchall()
            yield from (key for _, key in rows if isinstance(key, str))
            if len(rows) < size:
                return
            rowid = rows[-1][0]

    def catch_up(self) -> bool | None:
        """Put up to KEY_READ_ROWS keys inserted since the last read into the filter; whether
        those were all of them (if not, the next call is due at once). None: another thread
        is reading them this moment (never waited for: a lookup then goes to disk). False
        with `lost` set: keys not read yet are gone from the log (the filter stops ruling
        out until `load`)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            rows = self._connection.execute(
                "SELECT seq, key FROM appliance_key_log WHERE seq > ? ORDER BY seq LIMIT ?",
                (self._seen, KEY_READ_ROWS),
            ).fetchall()
            if rows and rows[0][0] != self._seen + 1:  # numbers run on but for pruning
                self.lost, self._known.ready = True, False
                return False
            # Into the filter before the time is noted: no thread may see the sync done
            # and rule out a key that is in this read.
            self._known.add(key for _, key in rows)
            complete = len(rows) < KEY_READ_ROWS
            if rows:
                self._seen = rows[-1][0]
            self._synced = time.monotonic() if complete else 0.0
            return complete
        finally:
            self._lock.release()

    def prune(self) -> None:
        """Drop log entries older than the last KEY_LOG_ROWS (the writer thread)."""
        with self._lock:
            self._connection.execute(
                "DELETE FROM appliance_key_log"
                " WHERE seq <= (SELECT max(seq) FROM appliance_key_log) - ?",
                (KEY_LOG_ROWS,),
            )

    def due(self) -> bool:
        return time.monotonic() - self._synced >= KEY_FILTER_SYNC_SECONDS

    def close(self) -> None:
        with self._lock:
            self._connection.close()


class ResponseCache:
    def __init__(
        self,
        directory: Path,
        *,
        size_limit_bytes: int,
        ttl_seconds: float,
        enabled: bool = True,
        scope: str = "key",
        shared: SharedCache | None = None,
        memory_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.directory = directory
        self.scope = scope  # "key": callers pass their key id into cache_key (see config)
        self.size_limit = size_limit_bytes
        self.ttl = ttl_seconds
        self.shared = shared  # cluster mode: a second level every replica reads (Redis)
        self._cache: diskcache.Cache | None = self._open() if enabled else None
        self._memory = _Memory(memory_bytes) if memory_bytes else None
        # ~1 MB at the default 1 GB: few false positives for vectors (~3.5 KB an entry),
        # more for small answers, each only the lookup every miss used to cost.
        self._filter = _KeyFilter(size_limit_bytes // 2048) if self._cache is not None else None
        self._disk_keys: _DiskKeys | None = None  # set by the writer thread
        self._reload_keys = False  # the key log lost keys: the writer scans the disk again
        self._logged = 0  # answers written since the key log was last pruned
        self._queued: dict[str, bytes] = {}  # encoded entries not yet committed
        self._local_only: dict[str, bytes] = {}  # queued entries that came from `shared`
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._writes = 0  # batches handed to the writer
        self._written = 0  # batches committed (or given up on)
        self._closing = False
        self._urgent = False  # a flush waits: commit without gathering more
        self._writer_idle = False  # waiting for work: the next write must wake it
        self._writer: threading.Thread | None = None
        if self._cache is not None:
            self._writer = threading.Thread(target=self._write_loop, name="cache-writer")
            self._writer.daemon = True
            self._writer.start()

    @property
    def enabled(self) -> bool:
        return self._cache is not None

    def _open(self) -> diskcache.Cache | None:
        def make() -> diskcache.Cache:
            # Values are msgpack bytes, which diskcache stores as raw blobs: no pickle ever,
            # and ~4x cheaper to write and ~15x cheaper to read than JSONDisk for a vector
            # (measured: 88 vs 336 us per write, 6 vs 105 us per read, 384 floats).
            return diskcache.Cache(
                str(self.directory),
                size_limit=self.size_limit,
                timeout=1,
                eviction_policy="least-recently-stored",
            )

        try:
            return make()
        except Exception as exc:
            log.warning("cache at %s unreadable (%s): starting a fresh one", self.directory, exc)
        try:
            aside = self.directory.with_name(f"{self.directory.name}.corrupt-{int(time.time())}")
            shutil.move(str(self.directory), aside)
            return make()
        except Exception as exc:
            log.warning("cache disabled: %s", exc)
            return None

    def _local(self, keys: list[str]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        memory = self._memory
        for key in dict.fromkeys(keys):
            value = memory.get(key) if memory is not None else None
            if value is None:
                value = self._queued.get(key)
            if value is None and self._on_disk(key):
                value = self._cache.get(key)  # type: ignore[union-attr]
                if memory is not None and isinstance(value, bytes):
                    memory.put(key, value)
            values[key] = value
        return values

    def _on_disk(self, key: str) -> bool:
        """False when the disk cannot hold `key` (see _KeyFilter); a key ruled out is
        checked once more against what other processes committed, at most every
        KEY_FILTER_SYNC_SECONDS."""
        known, disk = self._filter, self._disk_keys
        if known is None or disk is None or known.may_hold(key):  # may_hold: True until ready
            return True
        if not disk.due():
            return False
        try:
            complete = disk.catch_up()
        except Exception as exc:
            known.ready = False
            log.warning("cache keys unreadable (%s): every miss is looked up on disk", exc)
            return True
        if complete is None:  # another thread is reading them this moment: look on disk
            return True
        if disk.lost:  # the writer reads every key again; until then every miss goes to disk
            with self._lock:
                self._reload_keys = True
                self._wake.notify_all()
            return True
        # Still behind (other workers wrote more than one read since this one last looked):
        # the key may be among those not read yet.
        return not complete or known.may_hold(key)

    def _load_disk_keys(self) -> None:
        """In the writer thread, at its start and when the key log lost keys not read yet:
        every key on disk into the filter (until then, and if this fails, every miss is
        looked up on disk as before)."""
        assert self._cache is not None and self._filter is not None
        try:
            if self._disk_keys is None:
                path = Path(self._cache.directory) / diskcache.core.DBNAME
                self._disk_keys = _DiskKeys(path, self._filter)
            self._disk_keys.load()
        except Exception as exc:
            self._filter.ready = False
            log.warning("cache keys unreadable (%s): every miss is looked up on disk", exc)

    def get_many(self, keys: list[str]) -> dict[str, Hit]:
        """Blocking (disk, and Redis in cluster mode): for worker threads and small batches."""
        if self._cache is None:
            return {}
        try:
            values = self._local(keys)
            if self.shared is not None:
                missing = [k for k, v in values.items() if not isinstance(v, bytes)]
                if missing:
                    found = self.shared.get_many(missing)
                    values.update(found)
                    self._keep_local(found)
        except Exception as exc:
            log.warning("cache read failed (%s): treated as a miss", exc)
            return {}
        return self._hits(values)

    def get_local(self, keys: list[str]) -> dict[str, Hit]:
        """The first level alone (disk and queued writes; microseconds)."""
        if self._cache is None:
            return {}
        try:
            return self._hits(self._local(keys))
        except Exception as exc:
            log.warning("cache read failed (%s): treated as a miss", exc)
            return {}

    def shared_names(self, keys: list[str]) -> list[str]:
        """Where the second level keeps `keys` (none on a single box)."""
        return [] if self.shared is None or self._cache is None else self.shared.names(keys)

    def absorb(self, keys: list[str], blobs: list[bytes | None]) -> dict[str, Hit]:
        """Entries the second level returned for `keys` (read with another call): decoded,
        and kept on this disk too."""
        found = {k: b for k, b in zip(keys, blobs, strict=False) if isinstance(b, bytes)}
        if not found:
            return {}
        self._keep_local(found)
        return self._hits(dict(found))

    def _hits(self, values: dict[str, Any]) -> dict[str, Hit]:
        hits: dict[str, Hit] = {}
        try:
            for key, value in values.items():
                if not isinstance(value, bytes):
                    continue
                try:
                    entry = msgspec.msgpack.decode(value, type=_Entry)
                except msgspec.DecodeError:
                    continue  # an unreadable entry is a miss
                if time.time() - entry.created > self.ttl:
                    continue  # counted from the answer, not from the (later) write
                hits[key] = Hit(entry.output, entry.truncated, entry.created)
        except Exception as exc:
            log.warning("cache read failed (%s): treated as a miss", exc)
            return {}
        return hits

    def _keep_local(self, blobs: dict[str, bytes]) -> None:
        """Entries another replica computed, written to this disk too (not back to Redis)."""
        if not blobs or self._closing:
            return
        self._queue(blobs, from_shared=True)

    def set_many(self, items: dict[str, tuple[dict[str, Any], bool]]) -> None:
        """Queue the answers for the writer; readable by `get_many` from now on."""
        if self._cache is None or self._closing:
            return
        now = time.time()
        blobs = {
            key: msgspec.msgpack.encode(_Entry(output, truncated, now))
            for key, (output, truncated) in items.items()
        }
        self._queue(blobs, from_shared=False)

    def _queue(self, blobs: dict[str, bytes], *, from_shared: bool) -> None:
        """Into the memory level and the writer's queue (`from_shared`: not written back to
        the shared level). Only an idle writer is woken: one gathering a batch takes these
        along anyway, and a wake-up per answer (a thread switch, a GIL hand-off) was a tenth
        of a core at c=32 misses."""
        if self._memory is not None:
            for key, blob in blobs.items():
                self._memory.put(key, blob)
        with self._lock:
            if len(self._queued) + len(blobs) > MAX_QUEUED:
                return  # the writer is far behind (a stuck disk): serve these uncached
            self._queued.update(blobs)
            if self._filter is not None:
                self._filter.add(blobs)
            if from_shared:
                self._local_only.update(blobs)
            self._writes += 1
            if self._writer_idle:
                self._wake.notify_all()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything queued so far is committed (or given up on)."""
        with self._lock:
            target = self._writes
            self._urgent = True
            self._wake.notify_all()
            self._wake.wait_for(lambda: self._written >= target, timeout)

    def _write_loop(self) -> None:
        assert self._cache is not None
        self._load_disk_keys()
        while True:
            with self._lock:
                self._writer_idle = True
                self._wake.wait_for(
                    lambda: self._written < self._writes or self._closing or self._reload_keys
                )
                self._writer_idle = False
                reload, self._reload_keys = self._reload_keys, False
            if reload:
                self._load_disk_keys()
                continue
            with self._lock:
                if self._written >= self._writes:  # closing, nothing left
                    return
                # Gather what comes meanwhile into the same transaction: under load one
                # commit (and one wake-up) for many answers. Queued entries are readable.
                self._wake.wait_for(lambda: self._urgent or self._closing, WRITE_INTERVAL)
                self._urgent = False
                batch, target = dict(self._queued), self._writes
                local_only, self._local_only = self._local_only, {}
            if self.shared is not None:
                fresh = {k: v for k, v in batch.items() if local_only.get(k) is not v}
                try:
                    if fresh:
                        self.shared.set_many(fresh, self.ttl)
                except Exception as exc:  # the writer must outlive any shared-level error
                    log.warning("shared cache write failed (%s): %d local only", exc, len(fresh))
            try:
                # One SQLite transaction for everything queued meanwhile.
                with self._cache.transact():
                    for key, blob in batch.items():
                        self._cache.set(key, blob, expire=self.ttl)
            except Exception as exc:
                log.warning("cache write failed (%s): %d answers left uncached", exc, len(batch))
            self._logged += len(batch)
            if self._logged >= KEY_LOG_ROWS // 10 and self._disk_keys is not None:
                self._logged = 0
                try:
                    self._disk_keys.prune()
                except Exception as exc:  # the next one tries again
                    log.warning("cache key log not pruned (%s)", exc)
            with self._lock:
                for key, blob in batch.items():
                    if self._queued.get(key) is blob:
                        del self._queued[key]
                self._written = target
                self._wake.notify_all()

    def close(self) -> None:
        if self._writer is not None:
            self.flush()
            with self._lock:
                self._closing = True
                self._wake.notify_all()
            self._writer.join(timeout=10)
            self._writer = None
        if self._disk_keys is not None:
            self._disk_keys.close()
        if self._cache is not None:
            self._cache.close()
