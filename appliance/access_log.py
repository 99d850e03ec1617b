"""The access log: one line per API request, written in batches.

Through `logging` a line cost about 60 us of the event loop (a LogRecord, the JSON
formatter, a flush per line), a fifth of a cached answer's whole cost (py-spy under wrk,
c=8). Here a line is one msgspec encode into a buffer on the event loop; the buffer goes to
stderr when it holds 32 KB or 50 ms after its first line, whichever comes first, and at
shutdown. The lines look like every other log line (the same JSON keys, or text).

Chunks written are whole lines of at most PIPE_BUF bytes, so that several worker processes
sharing one stderr pipe never interleave inside a line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import Any

import msgspec

PIPE_BUF = 4096
FLUSH_BYTES = 32_768
FLUSH_SECONDS = 0.05

_encode = msgspec.json.Encoder().encode


class AccessLog:
    def __init__(self, fmt: str = "json", fd: int | None = None) -> None:
        self.json = fmt == "json"
        self.fd = fd
        # Off when the level hides INFO lines of the appliance.access logger, as before.
        self.enabled = logging.getLogger("appliance.access").isEnabledFor(logging.INFO)
        self._lines: list[bytes] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = ""

    def _time(self, now: float) -> str:
        """`2026-12-01 22:02:28,532`, the logging module's asctime: the second is formatted
        once per second."""
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._stamp},{int((now - second) * 1000):03d}"

    def write(self, fields: dict[str, Any]) -> None:
        """Queue one line (event loop thread only)."""
        if not self.enabled:
            return
        stamp = self._time(time.time())
        if self.json:
            line = _encode(
                {
                    "time": stamp,
                    "level": "INFO",
                    "logger": "appliance.access",
                    "message": "request",
                    **fields,
                }  # fmt: skip
            )
        else:
            detail = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
            line = f"{stamp} INFO appliance.access: request {detail}".encode()
        self._lines.append(line + b"\n")
        self._size += len(line) + 1
        if self._size >= FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.flush)
            except RuntimeError:  # no loop (a test calling in directly): write at once
                self.flush()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        lines, self._lines, self._size = self._lines, [], 0
        if not lines:
            return
        fd = sys.stderr.fileno() if self.fd is None else self.fd
        chunk: list[bytes] = []
        size = 0
        try:
            for line in lines:
                if chunk and size + len(line) > PIPE_BUF:
                    _write_all(fd, b"".join(chunk))
                    chunk, size = [], 0
                chunk.append(line)
                size += len(line)
            if chunk:
                _write_all(fd, b"".join(chunk))
        except OSError:
            pass  # stderr gone (a closed pipe): the access log must never fail a request


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
