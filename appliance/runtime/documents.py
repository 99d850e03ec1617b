"""Text out of documents sent as base64: PDF (pypdf) and DOCX (python-docx), at most
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


def _docx_text(raw: bytes) -> str:
    import docx

    try:
        document = docx.Document(io.BytesIO(raw))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
        raise ValidationFailed(
            f"The DOCX could not be read: {exc}", details={"field": "file"}
        ) from None
    # A DOCX has no fixed pages: count explicit page breaks, as a reader would see them.
    xml = document.element.xml
    pages = 1 + xml.count('w:type="page"') + xml.count("lastRenderedPageBreak")
    if pages > MAX_PAGES:
        raise ValidationFailed(
            f"The document has about {pages} pages; at most {MAX_PAGES}.",
            details={"field": "file", "pages": pages, "max_pages": MAX_PAGES},
        )
    parts = [p.text for p in document.paragraphs]
    for table in document.tables:
        parts.extend(cell.text for row in table.rows for cell in row.cells)
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
