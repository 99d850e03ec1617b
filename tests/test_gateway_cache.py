"""The response cache's write-behind: answers are readable at once, committed by one writer
thread in batches, flushed on close, and a failing disk only loses cache entries."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diskcache
import pytest

from appliance.gateway.cache import ResponseCache


def make(path: Path, memory_bytes: int = 0) -> ResponseCache:
    """Without the memory level unless asked: these tests look at the disk level."""
    return ResponseCache(path, size_limit_bytes=10**8, ttl_seconds=3600, memory_bytes=memory_bytes)


def _disk_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The keys looked up in SQLite from now on (the real lookups, recorded)."""
    reads: list[str] = []
    real_get = diskcache.Cache.get

    def counted(self: diskcache.Cache, key: str, *args: object, **kwargs: object) -> object:
        reads.append(key)
        return real_get(self, key, *args, **kwargs)

    monkeypatch.setattr(diskcache.Cache, "get", counted)
    return reads


def test_a_queued_answer_is_readable_before_its_write_and_lands_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    real_set = diskcache.Cache.set

    def slow_set(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        release.wait(5)
        return real_set(self, *args, **kwargs)

    monkeypatch.setattr(diskcache.Cache, "set", slow_set)
    cache = make(tmp_path / "c")
    cache.set_many({"a": ({"vector": [1.0, 2.0]}, False), "b": ({"vector": [3.0]}, True)})
    hits = cache.get_many(["a", "b", "c"])  # the writer is still held
    assert {k: (h.output, h.truncated) for k, h in hits.items()} == {
        "a": ({"vector": [1.0, 2.0]}, False),
        "b": ({"vector": [3.0]}, True),
    }
    release.set()
    cache.close()  # waits for the writer
    again = make(tmp_path / "c")
    assert set(again.get_many(["a", "b"])) == {"a", "b"}
    again.close()


def test_many_answers_share_one_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    transactions = []
    real_transact = diskcache.Cache.transact

    def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        release.wait(5)
        transactions.append(1)
        return real_transact(self, *args, **kwargs)

    monkeypatch.setattr(diskcache.Cache, "transact", counted)
    cache = make(tmp_path / "c")
    cache.set_many({"first": ({"x": 0}, False)})
    for i in range(50):  # queued while the writer waits on its first batch
        cache.set_many({f"k{i}": ({"x": i}, False)})
    release.set()
    cache.flush()
    assert len(transactions) <= 2
    assert len(cache.get_many([f"k{i}" for i in range(50)])) == 50
    cache.close()


def test_a_failing_disk_loses_only_cache_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(diskcache.Cache, "set", full_disk)
    cache = make(tmp_path / "c")
    with caplog.at_level(logging.WARNING, logger="appliance.cache"):
        cache.set_many({"a": ({"x": 1}, False)})
        cache.flush()
    assert "cache write failed" in caplog.text
    assert cache.get_many(["a"]) == {}  # dropped from the queue, not kept in memory forever
    cache.close()


def test_the_memory_level_answers_repeats_without_the_disk_and_stays_in_its_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = make(tmp_path / "c", memory_bytes=4096)
    cache.set_many({f"k{i}": ({"v": "x" * 100}, False) for i in range(200)})
    cache.flush()
    assert cache._memory is not None and cache._memory.size <= 4096
    # The last ones written are in memory: read with the disk unreadable.
    reads = _disk_reads(monkeypatch)
    assert cache.get_local(["k199"])["k199"].output == {"v": "x" * 100}
    assert reads == []
    # An old one comes from disk, and is then remembered.
    assert cache.get_local(["k0"])["k0"].output == {"v": "x" * 100}
    assert reads == ["k0"]
    cache.get_local(["k0"])
    assert reads == ["k0"]
    cache.close()


def test_an_expired_entry_in_memory_is_a_miss(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "c", size_limit_bytes=10**8, ttl_seconds=1)
    cache.set_many({"a": ({"v": 1}, False)})
    assert cache.get_local(["a"])["a"].output == {"v": 1}
    entry = cache._memory.get("a")  # type: ignore[union-attr]
    assert entry is not None
    import msgspec

    from appliance.gateway.cache import _Entry

    old = msgspec.msgpack.encode(_Entry({"v": 1}, False, 0.0))  # written at the epoch
    cache._memory.put("a", old)  # type: ignore[union-attr]
    assert cache.get_local(["a"]) == {}
    cache.close()


def _ready(cache: ResponseCache) -> None:
    """Wait for the writer thread to have read the keys already on disk into the filter."""
    deadline = time.monotonic() + 10
    while not (cache._filter is not None and cache._filter.ready):
        assert time.monotonic() < deadline, "the key filter never became ready"
        time.sleep(0.01)


def _two_workers(open_cache: Callable[[], ResponseCache]) -> tuple[ResponseCache, ResponseCache]:
    """Two caches on one directory, both ready: what server.workers > 1 gives two workers."""
    mine, other = open_cache(), open_cache()
    _ready(mine)
    _ready(other)
    return mine, other


def _commit(cache: ResponseCache, entries: dict[str, Any]) -> None:
    """Answers written to disk by `cache`, and time for other workers' filters to look."""
    from appliance.gateway.cache import KEY_FILTER_SYNC_SECONDS

    cache.set_many({k: (v, False) for k, v in entries.items()})
    cache.flush()
    time.sleep(KEY_FILTER_SYNC_SECONDS * 2)


def test_a_miss_the_key_filter_rules_out_never_reads_the_disk_and_no_stored_key_is_missed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance.gateway.cache import cache_key

    stored = [cache_key("m", "f", "t", f"text {i}", {}) for i in range(2000)]
    first = make(tmp_path / "c")
    first.set_many({k: ({"v": i}, False) for i, k in enumerate(stored)})
    first.close()
    cache = make(tmp_path / "c")  # a restart: the keys come from the disk alone
    _ready(cache)
    reads = _disk_reads(monkeypatch)
    hits = cache.get_local(stored)
    assert len(hits) == len(stored) and hits[stored[7]].output == {"v": 7}
    assert len(reads) == len(stored)
    reads.clear()
    unknown = [cache_key("m", "f", "t", f"other {i}", {}) for i in range(2000)]
    assert cache.get_local(unknown) == {}
    assert len(reads) <= 40  # false positives: ~1% at this size, each one lookup as before
    cache.close()


def test_an_answer_another_worker_commits_is_found_once_the_filter_catches_up(
    tmp_path: Path,
) -> None:
    mine, other = _two_workers(lambda: make(tmp_path / "c"))
    assert mine.get_local(["k"]) == {}
    _commit(other, {"k": {"v": 1}})
    assert mine.get_local(["k"])["k"].output == {"v": 1}
    other.close()
    mine.close()


def test_many_keys_are_read_from_the_disk_a_bounded_chunk_at_a_time_and_none_is_missed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At start (chunks of ten reads) and behind other workers (a read per lookup, each
    key looked up on disk while the filter is still behind)."""
    from appliance.gateway import cache as cache_module

    monkeypatch.setattr(cache_module, "KEY_READ_ROWS", 50)
    old = [f"old {i}" for i in range(1200)]
    first = make(tmp_path / "c")
    first.set_many({k: ({"v": k}, False) for k in old})
    first.close()
    mine, other = _two_workers(lambda: make(tmp_path / "c"))
    assert len(mine.get_local(old)) == len(old)
    new = [f"new {i}" for i in range(400)]
    _commit(other, {k: {"v": k} for k in new})
    # The last one first: the first read after the sync interval holds only the first 50.
    assert mine.get_local(["new 399"])["new 399"].output == {"v": "new 399"}
    assert len(mine.get_local(new)) == len(new)
    other.close()
    mine.close()


def test_a_key_stored_under_a_reused_rowid_is_found_by_the_other_worker(tmp_path: Path) -> None:
    """diskcache's table gives a new row the highest rowid + 1: once the newest rows are
    deleted (here expired, culled by an update's write), the next insert takes a rowid
    another worker has read past."""
    mine, other = _two_workers(
        lambda: ResponseCache(tmp_path / "c", size_limit_bytes=10**8, ttl_seconds=1, memory_bytes=0)
    )
    _commit(other, {"k1": {"v": 1}, "k2": {"v": 2}})
    assert mine.get_local(["zz"]) == {}  # caught up with both rows
    time.sleep(1.2)  # both expire
    _commit(other, {"k1": {"v": 1}})  # an update; its cull deletes k2's row
    _commit(other, {"k3": {"v": 3}})  # inserted under k2's old rowid
    rows = sqlite3.connect(tmp_path / "c" / diskcache.core.DBNAME).execute(
        "SELECT rowid, key FROM Cache ORDER BY rowid"
    )
    assert rows.fetchall() == [(1, "k1"), (2, "k3")]  # the case this test is about
    assert mine.get_local(["k3"])["k3"].output == {"v": 3}
    other.close()
    mine.close()


def test_a_worker_the_key_log_left_behind_reads_every_key_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Idle while another worker inserted more than the log keeps: no key is missed, and
    once the writer has read them all again misses are ruled out as before."""
    from appliance.gateway import cache as cache_module

    monkeypatch.setattr(cache_module, "KEY_LOG_ROWS", 20)  # pruned every 2 answers written
    mine, other = _two_workers(lambda: make(tmp_path / "c"))
    written = [f"k{i}" for i in range(100)]
    for i in range(0, 100, 5):
        other.set_many({k: ({"v": k}, False) for k in written[i : i + 5]})
        other.flush()
    (first,) = (
        sqlite3.connect(tmp_path / "c" / diskcache.core.DBNAME)
        .execute("SELECT min(seq) FROM appliance_key_log")
        .fetchone()
    )
    assert first > 1  # the entries mine never read are gone
    time.sleep(cache_module.KEY_FILTER_SYNC_SECONDS * 2)
    assert mine.get_local(["k0"])["k0"].output == {"v": "k0"}
    _ready(mine)
    reads = _disk_reads(monkeypatch)
    assert len(mine.get_local(written)) == len(written)
    reads.clear()
    assert mine.get_local([f"none {i}" for i in range(200)]) == {}
    assert len(reads) <= 10
    other.close()
    mine.close()


def test_an_error_of_the_shared_level_does_not_stop_the_writer(tmp_path: Path) -> None:
    """Cluster mode: Redis refusing writes (out of memory, a read-only replica) costs the
    other replicas that answer, never this disk's."""

    class Refusing:
        def get_many(self, keys: list[str]) -> dict[str, bytes]:
            return {}

        def names(self, keys: list[str]) -> list[str]:
            return keys

        def set_many(self, blobs: dict[str, bytes], ttl: float) -> None:
            raise RuntimeError("OOM command not allowed when used memory > 'maxmemory'")

    cache = ResponseCache(
        tmp_path / "c", size_limit_bytes=10**8, ttl_seconds=3600, memory_bytes=0, shared=Refusing()
    )
    for round_ in range(2):
        cache.set_many({f"a{round_}": ({"x": round_}, False)})
        cache.flush(timeout=3)
    assert cache._writer is not None and cache._writer.is_alive()
    assert diskcache.Cache(str(tmp_path / "c")).get("a1") is not None
    cache.close()
