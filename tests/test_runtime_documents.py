"""Documents cost bounded: DOCX streamed within budgets, PDFs read in a limited worker process,
and the document pool bounded (appliance.runtime.documents)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from appliance.errors import Overloaded, ValidationFailed
from appliance.runtime import documents
from appliance.runtime.documents import DocumentReader, extract_text
from tests.documents import b64, docx_with_body, make_docx, make_pdf, pdf_with_stream

ROOT = Path(__file__).resolve().parents[1]

# The bombs are built and read in a fresh interpreter, so its peak RSS (ru_maxrss) is that of
# the read alone: the test process's own peak says nothing about one call.
MEASURE = """
import json, resource, sys, time
from appliance.errors import ValidationFailed
from appliance.runtime.documents import extract_text
from tests.documents import b64, docx_with_body
body = {body}
data = b64(docx_with_body(body))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    extract_text(data)
    message = None
except ValidationFailed as exc:
    message = exc.message
seconds = time.perf_counter() - start
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({{"message": message, "seconds": seconds, "grown_kb": grown}}))
"""


@pytest.mark.parametrize(
    "body,message",
    [
        ('b"<w:p/>" * 7_000_000', "could not be read"),  # 42 MB: over the XML cap
        ('b"<w:p/>" * 1_300_000', "pages"),  # 7.8 MB, under the cap: the paragraph budget
        ('b"<w:p><w:r><w:t>" + b"a" * 8_000_000 + b"</w:t></w:r></w:p>"', "pages"),
        ('b"<w:p>" + b"<w:r/>" * 1_300_000 + b"</w:p>"', "elements"),
    ],
    ids=["40MB-empty-paragraphs", "8MB-empty-paragraphs", "one-giant-paragraph", "empty-runs"],
)
def test_a_docx_bomb_is_refused_fast_with_bounded_memory(body: str, message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", MEASURE.format(body=body)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    measured = json.loads(result.stdout)
    assert measured["message"] is not None and message in measured["message"]
    assert measured["seconds"] < 2.0
    # The old reader built the tree: +151 MB for 10 MB of <w:p/>.
    assert measured["grown_kb"] < 30 * 1024


def test_a_single_page_docx_counts_its_length_as_pages() -> None:
    # No page break at all, yet far over 20 pages of text.
    long = make_docx(["word " * 1000] * 70)
    with pytest.raises(ValidationFailed, match="pages") as caught:
        extract_text(b64(long))
    assert caught.value.details["max_pages"] == 20
    ordinary = make_docx(["word " * 100] * 30, page_breaks=3)
    assert extract_text(b64(ordinary)).count("word") == 3000


def test_docx_text_keeps_tabs_breaks_and_paragraph_lines() -> None:
    body = (
        b"<w:p><w:r><w:t>a</w:t><w:tab/><w:t>b</w:t><w:br/><w:t>c</w:t></w:r></w:p>"
        b'<w:p><w:r><w:br w:type="page"/><w:t xml:space="preserve"> d </w:t></w:r></w:p>'
    )
    assert extract_text(b64(docx_with_body(body))) == "a\tb\nc\n d "


def test_a_pdf_bomb_is_refused_fast_in_a_limited_worker() -> None:
    import resource

    # 300 KB that inflate to 300 MB: read in this process, pypdf reaches 600 MB of RSS.
    bomb = b64(pdf_with_stream(b"BT (" + b"a" * 300_000_000 + b") Tj ET"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ValidationFailed):
        extract_text(bomb)
    assert time.perf_counter() - start < 3.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024


def test_a_pdf_worker_past_its_time_is_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(documents, "PDF_TIMEOUT", 0.0)
    with pytest.raises(ValidationFailed, match="longer than") as caught:
        extract_text(b64(make_pdf(["slow"])))
    assert caught.value.details["field"] == "file"


def test_a_pdf_worker_past_its_memory_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # 2 MB of text inflated from a few KB: read under the default limit, refused under 1 MiB
    # (RLIMIT_AS), far below pypdf's own 75 MB stream caps.
    pdf = b64(pdf_with_stream(b"BT /F1 12 Tf (" + b"a" * 2_000_000 + b") Tj ET", font=True))
    assert extract_text(pdf).startswith("aaaa")
    monkeypatch.setattr(documents, "PDF_MEMORY", 1024 * 1024)
    with pytest.raises(ValidationFailed, match="memory") as caught:
        extract_text(pdf)
    assert caught.value.details["field"] == "file"


def test_a_pdf_worker_past_its_cpu_time_is_stopped_by_the_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 400,000 text operators: many CPU-seconds of pypdf. The wall-clock limit is put out of
    # the way, so what stops it is RLIMIT_CPU (SIGXCPU), long before the minute.
    pdf = b64(pdf_with_stream(b"BT /F1 12 Tf 10 10 Td " + b"(ab) Tj " * 400_000 + b"ET", True))
    monkeypatch.setattr(documents, "PDF_CPU_SECONDS", 1)
    monkeypatch.setattr(documents, "PDF_TIMEOUT", 60.0)
    start = time.perf_counter()
    with pytest.raises(ValidationFailed, match="more time or memory") as caught:
        extract_text(pdf)
    assert time.perf_counter() - start < 30
    assert caught.value.details["field"] == "file"


def test_pdfs_read_in_workers_keep_their_text() -> None:
    start = time.perf_counter()
    for n in range(5):
        assert extract_text(b64(make_pdf([f"page {n}", "second"]))) == f"page {n}\nsecond"
    # Forked from a warm server, not a fresh interpreter per file.
    assert time.perf_counter() - start < 2.0


def test_the_document_pool_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def slow(data: str) -> str:
        release.wait(10)
        return data

    monkeypatch.setattr(documents, "extract_text", slow)
    reader = DocumentReader(workers=1, queue=1)

    async def scenario() -> list[str]:
        first = asyncio.ensure_future(reader.extract_text("one"))
        second = asyncio.ensure_future(reader.extract_text("two"))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as caught:
            await reader.extract_text("three")
        assert caught.value.retry_after == 1
        release.set()
        done = await asyncio.gather(first, second)
        # Slots come back once the work is done.
        done.append(await reader.extract_text("four"))
        return done

    assert asyncio.run(scenario()) == ["one", "two", "four"]
