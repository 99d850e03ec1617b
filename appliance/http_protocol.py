"""uvicorn's httptools protocol, with one send per answer instead of two.

uvicorn writes the status line and headers when the app sends `http.response.start` and the
body when it sends `http.response.body`: two send() calls and, with TCP_NODELAY, two packets
for every answer. On this machine those writes were the largest single cost of a cached
answer on the event loop (18% of it; py-spy under wrk, c=8). Here the transport is wrapped
so that what is written during one step of the event loop leaves in one send, at the end of
that step: the head and body of an answer, or a stream's chunk, go out together, a loop step
later at most.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


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
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Flow control (pause/resume reading) keeps the real transport; the request cycles
        # made for this connection write through the wrapper.
        self.transport = _CorkedTransport(transport, self.loop)  # type: ignore[assignment]
