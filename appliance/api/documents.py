"""The text of a document, as an endpoint of its own, so that a pipeline (or a batch job) can
feed a PDF or DOCX to endpoints that take text, e.g. PDF -> summarisation -> classification."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, post

from appliance.api.schemas import NonEmpty
from appliance.api.tasks import Endpoint, Work, work_of
from appliance.runtime.documents import documents


class ExtractBody(msgspec.Struct, kw_only=True):
    file: NonEmpty
    """A base64 PDF or DOCX (at most 20 pages)."""


class ExtractResponse(msgspec.Struct):
    text: str
    characters: int


@post("/v1/extract", opt={"scope": "predict"}, tags=["documents"], status_code=200)
async def extract(data: ExtractBody, request: Request[Any, Any, Any]) -> ExtractResponse:
    """The text of a base64 PDF or DOCX, read as /v1/classify reads its `file` (no model runs,
    no tokens are charged)."""
    work = work_of(request)
    return (await extract_text(data, work))[0]


async def extract_text(data: ExtractBody, work: Work) -> tuple[ExtractResponse, None]:
    """The work of /v1/extract."""
    text = await documents.extract_text(data.file)
    return ExtractResponse(text=text, characters=len(text)), None


ENDPOINTS: dict[str, Endpoint] = {"/v1/extract": Endpoint(ExtractBody, extract_text)}
"""Each path of this module to its body type and work (batch jobs run them per line)."""

ROUTES = [extract]
