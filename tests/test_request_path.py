"""The cheaper request path's parts: the batched access log, one send per answer, the usage
log's time-batched writer (a reader sees its writes)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from appliance.access_log import PIPE_BUF, AccessLog
from appliance.gateway.usage import ROWS_PER_INSERT, Record, UsageLog
from appliance.http_protocol import CorkedHttpToolsProtocol, _CorkedTransport


def _reader(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_access_lines_are_json_like_the_other_log_lines_and_leave_in_whole_lines() -> None:
    read, write = os.pipe()
    log = AccessLog("json", fd=write)
    log.enabled = True
    for n in range(300):  # ~300 lines of ~150 bytes: several PIPE_BUF chunks
        log.write({"request_id": f"r{n}", "path": "/v1/x", "status": 200, "latency_ms": 1.5})
    log.flush()
    os.close(write)
    data = _reader(read)
    os.close(read)
    lines = [json.loads(line) for line in data.decode().splitlines()]
    assert [line["request_id"] for line in lines] == [f"r{n}" for n in range(300)]
    first = lines[0]
    assert first["logger"] == "appliance.access" and first["level"] == "INFO"
    assert first["message"] == "request" and first["status"] == 200
    time.strptime(first["time"].split(",")[0], "%Y-%m-%d %H:%M:%S")


def test_writes_are_whole_lines_of_at_most_pipe_buf_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several worker processes share one stderr: a write never splits a line."""
    writes: list[bytes] = []
    read, write = os.pipe()
    log = AccessLog("json", fd=write)
    log.enabled = True
    real = os.write

    def recording(fd: int, data: bytes) -> int:
        writes.append(bytes(data))
        return real(fd, data)

    monkeypatch.setattr(os, "write", recording)
    for n in range(200):
        log.write({"request_id": f"r{n}", "pad": "x" * 50})
    log.flush()
    monkeypatch.undo()
    os.close(write)
    os.close(read)
    assert len(writes) > 1
    assert all(len(w) <= PIPE_BUF and w.endswith(b"\n") for w in writes)


def test_lines_are_flushed_by_a_timer_on_the_loop_and_off_below_info() -> None:
    read, write = os.pipe()
    os.set_blocking(read, False)

    async def run() -> bytes:
        log = AccessLog("text", fd=write)
        log.enabled = True
        log.write({"request_id": "r1", "status": 200, "model": None})
        await asyncio.sleep(0.2)  # nothing else happens: the timer writes it
        return os.read(read, 65536)

    data = asyncio.run(run())
    os.close(read)
    os.close(write)
    assert data.startswith(b"20") and b"appliance.access: request request_id=r1 status=200" in data
    assert b"model=" not in data
    assert AccessLog("json").enabled is False  # the root logger is at WARNING in tests


def test_the_corked_transport_sends_one_write_per_loop_step() -> None:
    async def run() -> tuple[list[bytes], bytes]:
        a, b = socket.socketpair()
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, a)
        sent: list[bytes] = []
        real = transport.write

        def recording(data: bytes) -> None:
            sent.append(bytes(data))
            real(data)

        transport.write = recording  # type: ignore[method-assign]
        corked = _CorkedTransport(transport, loop)  # type: ignore[arg-type]
        corked.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        corked.write(b"ok")
        assert sent == []  # held until the loop's next step
        await asyncio.sleep(0)
        corked.write(b"next")
        corked.close()  # close flushes first
        await asyncio.sleep(0.05)  # the transport closes on a later loop step
        b.settimeout(5)
        received = b""
        while chunk := b.recv(65536):
            received += chunk
        b.close()
        return sent, received

    sent, received = asyncio.run(run())
    assert sent == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", b"next"]
    assert received == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\noknext"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _serving(app: Any) -> Iterator[tuple[uvicorn.Server, str]]:
    """`app` under uvicorn with the corked protocol on a thread: (server, base URL)."""
    port = _free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http=CorkedHttpToolsProtocol, log_config=None
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        yield server, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_uvicorn_serves_keep_alive_and_streams_through_the_corked_protocol() -> None:
    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return
        await receive()
        if scope["path"] == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for part in (b"a", b"b", b"c"):
                await send({"type": "http.response.body", "body": part, "more_body": True})
                await asyncio.sleep(0.01)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        body = b'{"ok":true}'
        headers = [(b"content-type", b"application/json"), (b"content-length", b"11")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    import httpx

    with _serving(app) as (_, base), httpx.Client(base_url=base) as client:
        for _ in range(20):  # one kept-alive connection, answer after answer
            r = client.post("/x", content=b"{}")
            assert r.status_code == 200 and r.json() == {"ok": True}
        r = client.get("/stream")
        assert r.text == "abc" and r.headers["transfer-encoding"] == "chunked"


def test_a_reader_sees_the_records_accepted_before_it(tmp_path: Path) -> None:
    usage = UsageLog(tmp_path / "usage.db", retention_days=1)
    usage.start()
    try:
        now = time.time()
        for n in range(50):
            usage.record(Record(now, "k1", "POST /v1/x", "m", 200, 1.0, 3, False, f"r{n}"))
        rows = usage.logs(
            key_id="k1", status=None, model=None, since=None, until=None, limit=100, offset=0
        )
        assert len(rows) == 50  # no sleep: logs() waited for the writer's batch
        assert usage.usage("k1", now - 10, now + 10)[0]["requests"] == 50
    finally:
        usage.stop()


def test_a_batch_longer_than_one_insert_is_written_whole_field_for_field(tmp_path: Path) -> None:
    usage = UsageLog(tmp_path / "usage.db", retention_days=1)
    count = ROWS_PER_INSERT * 2 + 7  # three statements, the last a short one
    now = time.time()
    sent = [
        Record(
            now + n * 1e-3,
            f"k{n % 3}",
            "POST /v1/x",
            None if n % 5 else "m",
            200 + n % 2,
            0.5 + n,
            n,
            n % 2 == 0,
            f"r{n}",
        )
        for n in range(count)
    ]
    for record in sent:  # queued before the writer starts: one batch
        usage.record(record)
    usage.start()
    try:
        usage.flush()
        with sqlite3.connect(tmp_path / "usage.db") as conn:
            rows = conn.execute(
                "SELECT ts, key_id, endpoint, model, status, latency_ms, tokens, cached, "
                "request_id FROM requests ORDER BY id"
            ).fetchall()
    finally:
        usage.stop()
    assert rows == [(*r[:7], int(r.cached), r.request_id) for r in sent]


def test_a_full_usage_queue_drops_and_counts(tmp_path: Path) -> None:
    pending = 3
    usage = UsageLog(tmp_path / "usage.db", retention_days=1, max_pending=pending)
    for n in range(pending + 2):  # not started: nothing drains
        usage.record(Record(time.time(), "k", "POST /x", None, 200, 1.0, 0, False, f"r{n}"))
    assert usage.dropped == 2


def test_the_spend_of_a_key_without_a_quota_is_committed_by_the_writer(tmp_path: Path) -> None:
    usage = UsageLog(tmp_path / "usage.db", retention_days=1)
    usage.start()
    usage.reserve("free", None, 7)
    usage.reserve("free", None, 5)
    usage.reserve("capped", 100, 3)  # a quota: committed by the request itself
    assert usage.spent("free") == 12  # counted at once
    usage.stop()
    again = UsageLog(tmp_path / "usage.db", retention_days=1)
    again.start()
    try:
        assert again.spent("free") == 12 and again.spent("capped") == 3
    finally:
        again.stop()


def test_the_server_counts_its_requests_for_a_lone_requests_inline_model_call(
    tmp_path: Path,
) -> None:
    from appliance.lifecycle import Lifecycle
    from appliance.server import _server
    from tests.conftest import make_settings

    assert not Lifecycle().alone()  # served by something else: never inline
    lifecycle = Lifecycle()
    server = _server(make_settings(tmp_path / "data", tmp_path / "models"), lifecycle)
    assert lifecycle.requests is server.server_state.tasks
    assert lifecycle.connections is server.server_state.connections

    # What the batcher asks, seen from inside requests: one client with one request is
    # alone; a second client's connection, or its request in progress, is not.
    seen: list[bool] = []
    release = asyncio.Event()
    loops: list[asyncio.AbstractEventLoop] = []

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return
        await receive()
        loops.append(asyncio.get_running_loop())
        seen.append(lifecycle.alone())

        async def step() -> bool:
            return lifecycle.alone()

        # A call from a task of the request's own (a pipeline's steps run at once) is not
        # the request's: its sibling would wait behind it on the loop.
        assert not await asyncio.create_task(step())
        if scope["path"] == "/hold":
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    import httpx

    with _serving(app) as (plain, base):
        lifecycle.connections = plain.server_state.connections
        lifecycle.requests = plain.server_state.tasks
        deadline = time.monotonic() + 10
        with httpx.Client(base_url=base) as one, httpx.Client(base_url=base) as other:
            assert one.post("/x").status_code == 200
            assert one.post("/x").status_code == 200  # the same kept-alive connection
            assert other.post("/x").status_code == 200  # `one` is still connected
        while plain.server_state.connections and time.monotonic() < deadline:
            time.sleep(0.01)  # both clients' closes reach the server
        holder = threading.Thread(target=httpx.post, args=(f"{base}/hold",), daemon=True)
        holder.start()
        while len(seen) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        with httpx.Client(base_url=base) as client:
            assert client.post("/x").status_code == 200  # while /hold is unanswered
        loops[0].call_soon_threadsafe(release.set)
        holder.join(10)
        assert seen == [True, True, False, True, False]
