"""Text out of documents sent as base64: PDF (pypdf) and DOCX (its XML, via defusedxml), at most
MAX_PAGES pages. Anything unreadable is a 422 that says why, never a 500."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import multiprocessing
import multiprocessing.context
import resource
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from xml.parsers import expat

from appliance.errors import Overloaded, ValidationFailed

MAX_PAGES = 20
MAX_BYTES = 10 * 1024 * 1024


def decode_base64(data: str, field: str = "file") -> bytes:
    if "," in data[:100] and data.startswith("data:"):
        data = data.split(",", 1)[1]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValidationFailed(
            f"`{field}` is not valid base64.", details={"field": field}
        ) from None
    if not raw:
        raise ValidationFailed(f"`{field}` is empty.", details={"field": field})
    if len(raw) > MAX_BYTES:
        raise ValidationFailed(
            f"`{field}` is {len(raw)} bytes; at most {MAX_BYTES}.", details={"field": field}
        )
    return raw


PDF_TIMEOUT = 10.0
"""Wall-clock seconds a PDF gets before its worker process is killed."""
PDF_CPU_SECONDS = 5
"""CPU seconds a PDF's worker may use (RLIMIT_CPU: the kernel stops it past that)."""
PDF_MEMORY = 512 * 1024 * 1024
"""Address space a PDF's worker may add to what the fork server had (RLIMIT_AS): a stream
that inflates past it fails to allocate, and the document is refused."""
MAX_TEXT_CHARS = MAX_PAGES * 10_000
"""Text kept from a PDF (the model reads far less); a page of tiny type is under 10,000."""


def _pdf_text_here(raw: bytes) -> str:
    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(raw))
    pages = reader.pages
    if len(pages) > MAX_PAGES:
        raise ValidationFailed(
            f"The PDF has {len(pages)} pages; at most {MAX_PAGES}.",
            details={"field": "file", "pages": len(pages), "max_pages": MAX_PAGES},
        )
    parts, chars = [], 0
    for page in pages:
        text = page.extract_text() or ""
        parts.append(text)
        chars += len(text) + 1
        if chars > MAX_TEXT_CHARS:
            break
    return "\n".join(parts)[:MAX_TEXT_CHARS]


def _limit_self(cpu_seconds: int, memory: int) -> None:
    with open("/proc/self/statm") as statm:
        address_space = int(statm.read().split()[0]) * resource.getpagesize()
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = address_space + memory
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, hard))


def _pdf_child(conn: Connection, raw: bytes, cpu_seconds: int, memory: int) -> None:
    """Runs in a process forked from the fork server: limits first, then pypdf."""
    try:
        _limit_self(cpu_seconds, memory)
        conn.send(("ok", _pdf_text_here(raw)))
    except ValidationFailed as exc:
        conn.send(("invalid", exc.message, exc.details))
    except MemoryError:
        conn.send(("invalid", "The PDF needs more memory than a document may use.", {}))
    except BaseException as exc:  # noqa: BLE001
        # Only the file's bytes reach this process, and pypdf raises nearly anything on a
        # malformed one (IndexError, RecursionError, its own errors): each is the file's fault.
        conn.send(("invalid", f"The PDF could not be read: {type(exc).__name__}: {exc}", {}))
    finally:
        conn.close()


_FORKSERVER: multiprocessing.context.ForkServerContext | None = None


def _context() -> multiprocessing.context.ForkServerContext:
    """The fork server: one clean interpreter with pypdf imported, started on first use. Each
    PDF gets a fork of it (about 10 ms) rather than a fresh interpreter (about 300 ms), and a
    fork is what lets the kernel's limits and a kill apply to one document alone; a warm pool
    would share its CPU-time limit across documents and die with the first bomb."""
    global _FORKSERVER
    if _FORKSERVER is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["__main__", "appliance.runtime.documents", "pypdf"])
        _FORKSERVER = context
    return _FORKSERVER


def _pdf_text(raw: bytes) -> str:
    """The PDF's text, read in a worker process with CPU, memory and time limits: a PDF bomb
    or a file that sends pypdf into a loop is a 422 within PDF_TIMEOUT, never the server's
    memory."""
    context = _context()
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(
        target=_pdf_child, args=(sender, raw, PDF_CPU_SECONDS, PDF_MEMORY), daemon=True
    )
    process.start()
    sender.close()
    try:
        if not receiver.poll(PDF_TIMEOUT):
            raise ValidationFailed(
                f"The PDF took longer than {PDF_TIMEOUT:g} s to read.",
                details={"field": "file", "timeout_seconds": PDF_TIMEOUT},
            )
        try:
            reply = receiver.recv()
        except EOFError:
            # Killed by its limits (SIGXCPU past the CPU time, or a failed allocation that
            # could not even report itself).
            raise ValidationFailed(
                "The PDF needs more time or memory than a document may use.",
                details={"field": "file"},
            ) from None
    finally:
        if process.is_alive():
            process.kill()
        process.join()
        process.close()
        receiver.close()
    if reply[0] == "ok":
        return str(reply[1])
    raise ValidationFailed(str(reply[1]), details={"field": "file", **reply[2]})


_W = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
MAX_DOCX_XML = 8 * 1024 * 1024
"""Most bytes of word/document.xml read (counted as it unpacks, not taken from the zip header):
a 20-page document with heavy formatting is under 2 MB of XML."""
CHARS_PER_PAGE = 3_000
"""A full page of small type is about 3,000 characters: a DOCX has no fixed pages, so its
length counts as ceil(characters / CHARS_PER_PAGE) pages when that is more than its breaks."""
PARAGRAPHS_PER_PAGE = 150
"""Likewise for paragraphs (empty ones and table cells included): even a page of one-line table
cells holds fewer, and a file of millions of `<w:p/>` is refused after a few thousand."""
MAX_DOCX_ELEMENTS = MAX_PAGES * 10_000
"""XML elements read at most: a formatted page is a few thousand (runs, their properties, table
cells); millions of empty runs would otherwise cost a second of parsing while adding no text."""
_CHUNK = 64 * 1024


class _DocxTooLong(Exception):
    def __init__(self, pages: int) -> None:
        self.pages = pages


class _DocxText:
    """expat callbacks over word/document.xml: the text, one line per paragraph, and the page
    estimate, kept within the budgets as it streams (no tree is built, so memory stays at the
    text itself plus one chunk)."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.chars = 0
        self.paragraphs = 0
        self.breaks = 0
        self.elements = 0
        self.started = False
        self.in_text = False

    @property
    def pages(self) -> int:
        return max(
            self.breaks + 1,
            -(-self.chars // CHARS_PER_PAGE),
            -(-self.paragraphs // PARAGRAPHS_PER_PAGE),
        )

    def _check(self) -> None:
        if self.pages > MAX_PAGES:
            raise _DocxTooLong(self.pages)

    def start(self, tag: str, attrs: dict[str, str]) -> None:
        self.elements += 1
        if self.elements > MAX_DOCX_ELEMENTS:
            raise ValueError(f"word/document.xml has over {MAX_DOCX_ELEMENTS} elements")
        if not tag.startswith(_W):
            return
        name = tag[len(_W) + 1 :]
        if name == "t":
            self.in_text = True
        elif name == "tab":
            self.text("\t")
        elif name == "br" or name == "cr":
            if attrs.get(f"{_W} type") == "page":
                self.breaks += 1
                self._check()
            else:
                self.text("\n")
        elif name == "lastRenderedPageBreak":
            self.breaks += 1
            self._check()
        elif name == "p":
            if self.started:
                self.text("\n")
            self.started = True

    def end(self, tag: str) -> None:
        if tag == f"{_W} t":
            self.in_text = False
        elif tag == f"{_W} p":
            self.paragraphs += 1
            self._check()

    def text(self, data: str) -> None:
        self.parts.append(data)
        self.chars += len(data)
        self._check()

    def data(self, data: str) -> None:
        if self.in_text:
            self.text(data)


def _no_dtd(*_: object) -> None:
    # A DOCX never has a DTD; refusing any keeps out entity expansion and external entities,
    # which is all defusedxml guarded against here.
    raise ValueError("the XML declares a DTD")


def _docx_text(raw: bytes) -> str:
    """The text of word/document.xml, one paragraph per line in document order (table cells
    included), streamed through expat with byte, character, paragraph and page budgets: a
    DOCX bomb (megabytes of `<w:p/>`, one giant paragraph, a zip bomb) stops at the first
    budget it crosses, in milliseconds, instead of becoming a tree. python-docx and lxml
    would add 14 MB to the serving install for this."""
    reader = _DocxText()
    parser = expat.ParserCreate(namespace_separator=" ")
    parser.buffer_text = True
    parser.StartElementHandler = reader.start
    parser.EndElementHandler = reader.end
    parser.CharacterDataHandler = reader.data
    parser.StartDoctypeDeclHandler = _no_dtd
    parser.EntityDeclHandler = _no_dtd
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            info = archive.getinfo("word/document.xml")
            if info.file_size > MAX_DOCX_XML:
                raise ValueError(f"word/document.xml unpacks to {info.file_size} bytes")
            read = 0
            with archive.open(info) as member:
                while chunk := member.read(_CHUNK):
                    read += len(chunk)
                    if read > MAX_DOCX_XML:  # the header's size can lie
                        raise ValueError(f"word/document.xml unpacks to over {MAX_DOCX_XML} bytes")
                    parser.Parse(chunk, False)
            parser.Parse(b"", True)
    except _DocxTooLong as exc:
        raise ValidationFailed(
            f"The document has about {exc.pages} pages or more; at most {MAX_PAGES}.",
            details={"field": "file", "pages": exc.pages, "max_pages": MAX_PAGES},
        ) from None
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, expat.ExpatError, EOFError) as exc:
        raise ValidationFailed(
            f"The DOCX could not be read: {exc}", details={"field": "file"}
        ) from None
    return "".join(reader.parts)


def extract_text(data: str) -> str:
    """The text of a base64 PDF or DOCX."""
    raw = decode_base64(data)
    if raw.startswith(b"%PDF"):
        text = _pdf_text(raw)
    elif raw.startswith(b"PK"):
        text = _docx_text(raw)
    else:
        raise ValidationFailed(
            "`file` must be a PDF or a DOCX document.", details={"field": "file"}
        )
    if not text.strip():
        raise ValidationFailed("The document has no extractable text.", details={"field": "file"})
    return text


DOCUMENT_WORKERS = 2
"""Documents read at once: their own threads, so a burst of files never takes the default
thread pool that model calls, the cache and the usage log run on."""
DOCUMENT_QUEUE = 8
"""Documents that may wait for a worker; past that a request is 503 OVERLOADED with
Retry-After, never an unbounded queue."""


class DocumentReader:
    """A small bounded pool for `extract_text`."""

    def __init__(self, workers: int = DOCUMENT_WORKERS, queue: int = DOCUMENT_QUEUE) -> None:
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="documents")
        self._slots = threading.BoundedSemaphore(workers + queue)

    async def extract_text(self, data: str) -> str:
        if not self._slots.acquire(blocking=False):
            raise Overloaded(
                "Too many documents are being read; retry shortly.",
                details={"field": "file"},
                retry_after=1,
            )
        try:
            future = self._executor.submit(extract_text, data)
        except BaseException:
            self._slots.release()
            raise
        # Freed when the work ends, not when the caller stops waiting: a dropped request's
        # document still holds its worker until it is done.
        future.add_done_callback(lambda _: self._slots.release())
        return await asyncio.wrap_future(future)


documents = DocumentReader()
"""The process's one document pool (its threads start on first use)."""
