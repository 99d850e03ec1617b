"""The server's own HTTP layer (appliance/http_protocol.py, appliance/api/recorder.py): what a
client that stalls, leaves, or sends what is not HTTP gets, and how such requests are recorded,
against `appliance serve` itself."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_jobs import LiveServer

TIMEOUT = 0.5
KEEP_ALIVE = 2.0


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("protocol")
    server = LiveServer(
        root,
        models_dir,
        server=f"read_timeout_seconds = {TIMEOUT}\nkeep_alive_seconds = {KEEP_ALIVE}",
    ).start()
    yield server
    server.stop()


def exchange(live: LiveServer, data: bytes, *, then_close: bool = False) -> bytes:
    """What the server answers `data` with, up to when it closes the connection (or, with
    `then_close`, the client leaves at once)."""
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
        sock.sendall(data)
        if then_close:
            return b""
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def head(live: LiveServer, length: int) -> bytes:
    return (
        "POST /v1/text-vectorisation HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        f"x-api-key: {live.key}\r\ncontent-type: application/json\r\n"
        f"content-length: {length}\r\n\r\n"
    ).encode()


def parts(answer: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    top, _, body = answer.partition(b"\r\n\r\n")
    lines = top.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


def logged(live: LiveServer, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = httpx.get(f"{live.url}/v1/logs?limit=200", headers=live.headers).json()["data"]
        found = [r for r in rows if r["request_id"] == request_id]
        if found:
            return found[0]  # type: ignore[no-any-return]
        time.sleep(0.1)
    raise AssertionError(f"request {request_id} was never recorded")


def test_a_stalled_body_is_answered_408_in_json_and_recorded_as_408(live: LiveServer) -> None:
    started = time.monotonic()
    answer = exchange(live, head(live, 100) + b'{"text": "half a bo')
    took = time.monotonic() - started
    status, headers, body = parts(answer)
    assert status == 408 and headers["content-type"] == "application/json"
    assert TIMEOUT * 0.9 < took < TIMEOUT + 5
    assert body["code"] == "REQUEST_TIMEOUT" and headers["x-request-id"] == body["request_id"]
    assert logged(live, body["request_id"])["status"] == 408


def test_a_stalled_head_is_answered_408_too(live: LiveServer) -> None:
    answer = exchange(live, b"POST /v1/text-vectorisation HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api")
    status, _, body = parts(answer)
    assert status == 408 and body["code"] == "REQUEST_TIMEOUT"


def test_a_body_that_keeps_coming_is_never_cut(live: LiveServer) -> None:
    """The timeout is between bytes, not for the whole body: a slow upload still lands."""
    body = json.dumps({"text": "slow but steady " * 4, "model": "tiny-embed"}).encode()
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
        sock.sendall(head(live, len(body)))
        for i in range(0, len(body), len(body) // 4 + 1):  # ~4 pieces, 1.2 s in all
            time.sleep(TIMEOUT * 0.6)
            sock.sendall(body[i : i + len(body) // 4 + 1])
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < 10:
            answer += sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]


def test_a_client_that_leaves_mid_body_is_recorded_as_499_not_500(live: LiveServer) -> None:
    from appliance.api.request_id import new_request_id

    request_id = new_request_id()
    data = head(live, 100).replace(b"\r\n\r\n", f"\r\nx-request-id: {request_id}\r\n\r\n".encode())
    exchange(live, data + b'{"text": "gone', then_close=True)
    assert logged(live, request_id)["status"] == 499


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: -1\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        b"GET /healthz HTTP/1.1\r\nhost x\r\n\r\n",
    ],
)
def test_what_is_not_http_gets_the_json_error_body(live: LiveServer, request_bytes: bytes) -> None:
    status, headers, body = parts(exchange(live, request_bytes))
    assert status == 400 and headers["content-type"] == "application/json"
    assert body["code"] == "BAD_REQUEST" and body["request_id"] == headers["x-request-id"]


def test_a_pipelined_request_waiting_for_the_one_before_is_not_timed_out() -> None:
    """uvicorn stops reading while an earlier request on the connection is answered: the
    client of a request queued behind it is waiting for the server, not stalled. uvicorn
    itself, with this protocol, and an app whose first answer takes longer than the timeout."""
    import asyncio
    import threading

    import uvicorn

    from appliance.http_protocol import CorkedHttpToolsProtocol
    from tests.test_imports import free_port

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        size = 0
        while (message := await receive())["type"] == "http.request":
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        if scope["path"] == "/slow":
            await asyncio.sleep(TIMEOUT * 3)
        body = f"{scope['path']} {size}".encode()
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    protocol = type("P", (CorkedHttpToolsProtocol,), {"read_timeout": TIMEOUT})
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, http=protocol, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    try:
        big = b"x" * 1_000_000  # more than one read: uvicorn pauses reading behind /slow
        pipelined = (
            b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n"
            b"POST /big HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(big)
        ) + big
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(pipelined)
            answer = b""
            while answer.count(b"HTTP/1.1 ") < 2 or not answer.endswith(b"/big 1000000"):
                chunk = sock.recv(65536)
                assert chunk, answer
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 ") and b"408" not in answer
        assert b"/slow 0" in answer
    finally:
        server.should_exit = True
        thread.join(10)


def test_an_idle_connection_is_kept_for_keep_alive_seconds_then_closed(live: LiveServer) -> None:
    """Not uvicorn's 5 s: a proxy that keeps idle connections for longer would send a request
    down one the server is closing and answer 502 (server.keep_alive_seconds, above it)."""
    ask = b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
        for pause in (0.0, KEEP_ALIVE / 2):  # the second one comes on the same connection
            time.sleep(pause)
            sock.sendall(ask)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        answered = time.monotonic()
        assert sock.recv(65536) == b""  # the server closed it, idle
        idle = time.monotonic() - answered
    assert KEEP_ALIVE * 0.9 < idle < KEEP_ALIVE + 2, idle
