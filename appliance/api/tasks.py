"""The task API (seeds/task-api.txt), at /v1/<name> and at the seed's root paths.

Each endpoint takes one item or a list, and answers in the same shape.
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, post

from appliance.api.responses import call_for, inference_response
from appliance.api.schemas import TextVectorisationBody, VectorResponse
from appliance.config import Settings
from appliance.errors import ValidationFailed
from appliance.inference import Inference


def as_batch(value: Any, field: str, limit: int) -> tuple[list[Any], bool]:
    """(items, was_batch). A list must hold 1..limit items."""
    if not isinstance(value, list):
        return [value], False
    if not value:
        raise ValidationFailed(f"`{field}` must not be an empty list.", details={"field": field})
    if len(value) > limit:
        raise ValidationFailed(
            f"`{field}` has {len(value)} items; at most {limit} per request.",
            details={"field": field, "max_items": limit},
        )
    return value, True


@post(
    ["/v1/text-vectorisation", "/text-vectorisation"],
    opt={"scope": "predict"},
    tags=["tasks"],
    status_code=200,
)
async def text_vectorisation(
    data: TextVectorisationBody,
    request: Request[Any, Any, Any],
    inference: Inference,
    settings: Settings,
) -> Response[VectorResponse]:
    """Vectorise a text or a list of texts."""
    texts, batch = as_batch(data.text, "text", settings.server.max_batch_items)
    outcome = await inference.run(
        data.model,
        [{"text": t} for t in texts],
        call=call_for(request),
        tasks={"feature-extraction"},
        truncate=data.truncate,
    )
    vectors = [r.output["vector"] for r in outcome.results]
    return inference_response(VectorResponse(vector=vectors if batch else vectors[0]), outcome)
