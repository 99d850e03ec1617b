"""A job's files under data_dir/jobs/<id>/ and the only code that touches them.

    input.ndjson     the upload, as received
    results.ndjson   one result line per non-blank input line, in input order, appended
    state.json       JobState: metadata and the checkpoint, replaced atomically

Durability: a chunk's result lines are appended and fsynced, then state.json is replaced
(write, fsync, rename, fsync the folder) with the checkpoint: lines done, the byte offset in
the input after them and the committed length of results.ndjson. A crash between the two
leaves result bytes past the checkpoint; `resume` truncates them before the job goes on, so
every input line ends up with exactly one result line.

An upload is written to a hidden `.upload-<id>` folder and renamed into place once complete;
a deleted job is renamed to `.deleted-<id>` before its files go. Leftovers of either (a crash
mid-way) are removed at start. Every method blocks: call them off the event loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import msgspec

log = logging.getLogger("appliance.jobs")

INPUT, RESULTS, STATE = "input.ndjson", "results.ndjson", "state.json"
UPLOAD_PREFIX, DELETED_PREFIX = ".upload-", ".deleted-"
# Blank lines (nothing, or a lone CR of a CRLF file) are skipped: they are neither counted nor
# answered. A line of spaces is a line, and gets the invalid-JSON error.
BLANK = (b"", b"\r")
STATUSES = ("created", "running", "completed", "failed", "cancelled")


class JobState(msgspec.Struct, kw_only=True):
    """What state.json holds: the job's metadata and its checkpoint."""

    id: str
    key_id: str
    """The key that created the job: its owner, and the key its lines run as."""
    endpoint: str
    model: str | None = None
    """Default `model` for lines that give none."""
    classifier: str | None = None
    """Default `classifier` for lines that give none (classify and tag endpoints)."""
    status: str = "created"
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    total: int
    """Non-blank lines in the input."""
    input_bytes: int
    done: int = 0
    """Lines answered and checkpointed."""
    failed: int = 0
    """Of those, lines answered with an error."""
    tokens: int = 0
    """Tokenizer tokens charged for the job's lines."""
    input_offset: int = 0
    """Byte offset in input.ndjson just after the last line done."""
    next_line: int = 1
    """The input line number (from 1) at input_offset."""
    results_bytes: int = 0
    """Committed length of results.ndjson."""
    error: dict[str, Any] | None = None
    """Why a failed job stopped: an API error body."""


class LineCounter:
    """Counts non-blank lines of a body fed in blocks, holding no more than a byte of it."""

    def __init__(self) -> None:
        self.lines = 0
        # The unfinished line so far, while it may still turn out blank; None once it cannot.
        self._open: bytes | None = b""

    @staticmethod
    def _extend(open_: bytes | None, more: bytes) -> bytes | None:
        if open_ is None:
            return None
        head = open_ + more[:2]  # blank lines are at most 1 byte: 2 more bytes settle it
        return head if head in BLANK else None

    def feed(self, block: bytes) -> None:
        parts = block.split(b"\n")
        if len(parts) == 1:
            self._open = self._extend(self._open, block)
            return
        first = self._extend(self._open, parts[0])
        middle = parts[1:-1]
        self.lines += (first is None) + len(middle) - middle.count(b"") - middle.count(b"\r")
        self._open = self._extend(b"", parts[-1])

    def finish(self) -> int:
        """The count, the unfinished last line included (a file need not end in a newline)."""
        if self._open is None:
            self.lines += 1
            self._open = b""
        return self.lines


class Upload:
    """A new job's input being written, in a hidden folder until `finish` moves it in place."""

    def __init__(self, root: Path, job_id: str) -> None:
        self.root, self.job_id = root, job_id
        self.folder = root / f"{UPLOAD_PREFIX}{job_id}"
        self.folder.mkdir(parents=True)
        self._fh: BinaryIO | None = open(self.folder / INPUT, "wb")  # noqa: SIM115
        self.counter = LineCounter()
        self.size = 0

    def write(self, block: bytes | bytearray) -> None:
        assert self._fh is not None
        self._fh.write(block)
        self.counter.feed(bytes(block) if isinstance(block, bytearray) else block)
        self.size += len(block)

    def finish(self, state: JobState) -> None:
        """Make the input and state durable, then publish the job under its id."""
        assert self._fh is not None
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        (self.folder / RESULTS).touch()
        write_atomically(self.folder / STATE, msgspec.json.encode(state))
        os.replace(self.folder, self.root / self.job_id)
        fsync_dir(self.root)

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass(slots=True)
class InputLine:
    number: int
    """The line's number in the input file, from 1."""
    raw: bytes | None
    """The line without its newline; None when longer than the line limit."""


class LineReader:
    """Reads a job's input from its checkpoint, line by line, never holding more than one line
    (and a line longer than `max_line_bytes` is skipped in pieces, not held)."""

    def __init__(self, path: Path, offset: int, next_line: int, max_line_bytes: int) -> None:
        self._fh = open(path, "rb")  # noqa: SIM115
        self._fh.seek(offset)
        self.offset, self.next_line, self.max_line_bytes = offset, next_line, max_line_bytes

    def read(self, count: int) -> list[InputLine]:
        """Up to `count` non-blank lines; fewer only at the end of the input. `offset` and
        `next_line` then point just after them."""
        lines: list[InputLine] = []
        while len(lines) < count:
            piece = self._fh.readline(self.max_line_bytes + 1)
            if not piece:
                break
            number = self.next_line
            self.offset += len(piece)
            self.next_line += 1
            if len(piece) > self.max_line_bytes and not piece.endswith(b"\n"):
                while piece and not piece.endswith(b"\n"):  # too long: skip the rest of it
                    piece = self._fh.readline(1 << 20)
                    self.offset += len(piece)
                lines.append(InputLine(number, None))
                continue
            raw = piece[:-1] if piece.endswith(b"\n") else piece
            if raw not in BLANK:
                lines.append(InputLine(number, raw))
        return lines

    def close(self) -> None:
        self._fh.close()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    """Replace `path` with `data`: a reader (or a crash) sees the old file or the new one.
    `sync_dir`: also make the replacement itself survive a power loss at once."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)


class JobStore:
    """The jobs folder: one subfolder per job."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def folder(self, job_id: str) -> Path:
        return self.root / job_id

    def results_path(self, job_id: str) -> Path:
        return self.folder(job_id) / RESULTS

    def load_all(self, keep_seconds: float = 0.0, clean: bool = True) -> list[JobState]:
        """Every job on disk, after removing what a crash left of uploads and deletions
        (`clean`; on a folder shared by replicas, only debris older than `keep_seconds`)."""
        self.root.mkdir(parents=True, exist_ok=True)
        states = []
        now = time.time()
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith((UPLOAD_PREFIX, DELETED_PREFIX)):
                with contextlib.suppress(OSError):
                    if clean and now - folder.stat().st_mtime >= keep_seconds:
                        shutil.rmtree(folder, ignore_errors=True)
                continue
            if not folder.is_dir():
                continue
            try:
                states.append(msgspec.json.decode((folder / STATE).read_bytes(), type=JobState))
            except (OSError, msgspec.DecodeError) as exc:
                log.error("job folder %s is unreadable and is ignored: %s", folder, exc)
        return states

    def load(self, job_id: str) -> JobState | None:
        """One job's checkpointed state, as on disk now (None: deleted)."""
        try:
            return msgspec.json.decode((self.folder(job_id) / STATE).read_bytes(), type=JobState)
        except (OSError, msgspec.DecodeError):
            return None

    def begin_upload(self, job_id: str) -> Upload:
        self.root.mkdir(parents=True, exist_ok=True)
        return Upload(self.root, job_id)

    def save(self, state: JobState, *, sync_dir: bool = True) -> None:
        write_atomically(
            self.folder(state.id) / STATE, msgspec.json.encode(state), sync_dir=sync_dir
        )

    def resume(self, state: JobState, max_line_bytes: int) -> tuple[LineReader, BinaryIO]:
        """Open a job to go on from its checkpoint: drop result bytes written after it (a
        crash between appending and checkpointing) and position the input just after it.
        Returns the input reader and the results file, open for appending."""
        folder = self.folder(state.id)
        results = open(folder / RESULTS, "r+b")  # noqa: SIM115
        if os.fstat(results.fileno()).st_size != state.results_bytes:
            log.warning("job %s: dropping results past its checkpoint", state.id)
            results.truncate(state.results_bytes)
            os.fsync(results.fileno())
        results.seek(state.results_bytes)
        reader = LineReader(folder / INPUT, state.input_offset, state.next_line, max_line_bytes)
        return reader, results

    def commit(self, results: BinaryIO, lines: bytes, state: JobState) -> None:
        """Append a chunk's result lines and make them durable, then checkpoint `state`."""
        results.write(lines)
        results.flush()
        os.fsync(results.fileno())
        # No fsync of the folder here (it costs as much again): should a power loss undo this
        # rename, the previous checkpoint comes back, and with it the truncation of the lines
        # appended since, which are then redone. Exactly once either way.
        self.save(state, sync_dir=False)

    def delete(self, job_id: str) -> None:
        folder = self.folder(job_id)
        doomed = self.root / f"{DELETED_PREFIX}{job_id}"
        try:
            os.replace(folder, doomed)
        except FileNotFoundError:
            return
        fsync_dir(self.root)
        shutil.rmtree(doomed, ignore_errors=True)

    def read_results(self, job_id: str, limit: int, block: int = 1 << 20) -> Iterator[bytes]:
        """The first `limit` bytes of the results, in blocks (the file may grow meanwhile)."""
        with open(self.results_path(job_id), "rb") as fh:
            remaining = limit
            while remaining > 0:
                data = fh.read(min(block, remaining))
                if not data:
                    return
                remaining -= len(data)
                yield data
