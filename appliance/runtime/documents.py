"""Text out of documents sent as base64: PDF (pypdf) and DOCX (its XML, via defusedxml), at most
MAX_PAGES pages. Anything unreadable is a 422 that says why, never a 500."""

from __future__ import annotations

import base64
import binascii
import io
import zipfile

from appliance.errors import ValidationFailed

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


def _pdf_text(raw: bytes) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(raw))
        pages = reader.pages
        if len(pages) > MAX_PAGES:
            raise ValidationFailed(
                f"The PDF has {len(pages)} pages; at most {MAX_PAGES}.",
                details={"field": "file", "pages": len(pages), "max_pages": MAX_PAGES},
            )
        return "\n".join(page.extract_text() or "" for page in pages)
    except ValidationFailed:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as exc:
        raise ValidationFailed(
            f"The PDF could not be read: {exc}", details={"field": "file"}
        ) from None


_W = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"
MAX_DOCX_XML = 50 * 1024 * 1024
"""Largest word/document.xml read (uncompressed): a zip bomb is refused before it unpacks."""


def _docx_text(raw: bytes) -> str:
    """The text of word/document.xml, one paragraph per line in document order (table cells
    included). A DOCX's text is all in that one XML part, so the standard parser (through
    defusedxml, which refuses entity tricks) does it: python-docx and lxml added 14 MB to the
    serving install for this."""
    from defusedxml.ElementTree import ParseError, fromstring

    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            info = archive.getinfo("word/document.xml")
            if info.file_size > MAX_DOCX_XML:
                raise ValueError(f"word/document.xml unpacks to {info.file_size} bytes")
            root = fromstring(archive.read(info))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, ParseError) as exc:
        # defusedxml's refusals (entities, DTDs) are ValueErrors too.
        raise ValidationFailed(
            f"The DOCX could not be read: {exc}", details={"field": "file"}
        ) from None
    # A DOCX has no fixed pages: count explicit page breaks, as a reader would see them.
    pages = 1
    for el in root.iter():
        if el.tag == f"{_W}lastRenderedPageBreak" or (
            el.tag == f"{_W}br" and el.get(f"{_W}type") == "page"
        ):
            pages += 1
    if pages > MAX_PAGES:
        raise ValidationFailed(
            f"The document has about {pages} pages; at most {MAX_PAGES}.",
            details={"field": "file", "pages": pages, "max_pages": MAX_PAGES},
        )
    parts = []
    for para in root.iter(f"{_W}p"):
        text = []
        for el in para.iter():
            if el.tag == f"{_W}t" and el.text:
                text.append(el.text)
            elif el.tag == f"{_W}tab":
                text.append("\t")
            elif el.tag in (f"{_W}br", f"{_W}cr") and el.get(f"{_W}type") != "page":
                text.append("\n")
        parts.append("".join(text))
    return "\n".join(parts)


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
