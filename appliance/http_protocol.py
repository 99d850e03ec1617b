"""uvicorn's httptools protocol, with one send per answer instead of two, a read timeout, and
the API's JSON error body for what uvicorn refuses before the app sees a request.

uvicorn writes the status line and headers when the app sends `http.response.start` and the
body when it sends `http.response.body`: two send() calls and, with TCP_NODELAY, two packets
for every answer. On this machine those writes were the largest single cost of a cached
answer on the event loop (18% of it; py-spy under wrk, c=8). Here the transport is wrapped
so that what is written during one step of the event loop leaves in one send, at the end of
that step: the head and body of an answer, or a stream's chunk, go out together, a loop step
later at most.

A request whose head or body stops arriving for `read_timeout` seconds (a stalled or slowloris
client: uvicorn itself only times out idle keep-alive connections) is answered 408 and its
connection closed; the app, waiting for the body, sees the client leave, and the request is
recorded as 408. A request uvicorn cannot parse (a bad Content-Length, a bad chunk, a header
line too long) gets the API's error body instead of uvicorn's plain-text 400.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any

import msgspec
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from appliance.api.recorder import READ_TIMED_OUT
from appliance.api.request_id import ensure_request_id, new_request_id
from appliance.errors import error_body


class _CorkedTransport:
    """The parts of asyncio.Transport uvicorn's HTTP/1.1 code uses, writes gathered until
    the loop's next step; everything else goes straight to the real transport."""

    __slots__ = ("_chunks", "_loop", "_scheduled", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._chunks: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes) -> None:
        self._chunks.append(data)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._chunks:
            return
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CorkedHttpToolsProtocol(HttpToolsProtocol):
    read_timeout = 60.0
    """Seconds a request's head or body may go without a byte (server.read_timeout_seconds)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Flow control (pause/resume reading) keeps the real transport; the request cycles
        # made for this connection write through the wrapper.
        self.transport = _CorkedTransport(transport, self.loop)  # type: ignore[assignment]
        self._reading = False  # between a request's first byte and its body's last
        self._last_read = 0.0
        self._read_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        self._last_read = self.loop.time()
        super().data_received(data)
        # Armed only for a request still incomplete after this read: one that came whole
        # (most) never makes a timer.
        if self._reading and self._read_timer is None and not self.transport.is_closing():
            self._read_timer = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading = True

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading = False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        super().connection_lost(exc)

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if not self._reading or self.transport.is_closing():
            return
        cycle = self.cycle
        # The cycle is this request's once its head is complete (else the last one's).
        current = cycle is not None and cycle.more_body and not cycle.response_complete
        if (
            self.flow.read_paused  # not reading: a pipelined request waits for the one before
            or self.pipeline
            or (not current and cycle is not None and not cycle.response_complete)
        ):
            self._last_read = self.loop.time()  # the client waits for this server, not idle
        idle = self.loop.time() - self._last_read
        if idle < self.read_timeout:  # bytes came meanwhile: wait out the rest
            self._read_timer = self.loop.call_later(self.read_timeout - idle, self._read_timed_out)
            return
        if current and cycle.response_started:
            self.transport.close()  # an answer is on its way already: only stop waiting
            return
        request_id = new_request_id()
        if current:
            cycle.scope.setdefault("state", {})[READ_TIMED_OUT] = True  # type: ignore[typeddict-unknown-key]
            request_id = ensure_request_id(cycle.scope)
        self._refuse(
            408,
            "REQUEST_TIMEOUT",
            f"No byte of the request for {self.read_timeout:g} s: the connection is closed.",
            request_id,
        )

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, "BAD_REQUEST", msg)

    def _refuse(self, status: int, code: str, message: str, request_id: str | None = None) -> None:
        """An error answer written below the app, then the connection closed."""
        request_id = request_id or new_request_id()
        body = msgspec.json.encode(error_body(code, message, details={}, request_id=request_id))
        reason = HTTPStatus(status).phrase.encode()
        head = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
        for name, value in self.server_state.default_headers:
            head.append(b"%s: %s\r\n" % (name, value))
        head.append(
            b"content-type: application/json\r\ncontent-length: %d\r\nx-request-id: %s\r\n"
            b"connection: close\r\n\r\n" % (len(body), request_id.encode("latin-1"))
        )
        self.transport.write(b"".join(head) + body)
        self.transport.close()
