"""POST /v1/custom and /custom: a user-exported custom model, fields mapped to its inputs."""

from __future__ import annotations

from typing import Any

from litestar import Response, post

from appliance.api.responses import inference_response
from appliance.api.tasks import Work
from appliance.errors import ValidationFailed


@post(["/v1/custom", "/custom"], opt={"scope": "predict"}, tags=["tasks"], status_code=200)
async def custom(data: dict[str, Any], work: Work) -> Response[dict[str, Any]]:
    """{"model": slug, <input name>: value, ...} -> {"output": ...}: each field named like one
    of the model's inputs (GET /v1/models/{slug} shows them) becomes that input."""
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise ValidationFailed(
            "`model` (the custom model's name) is required.", details={"field": "model"}
        )
    fields = {k: v for k, v in data.items() if k != "model"}
    outcome = await work.inference.run(
        model, [fields], call=work.call, tasks={"custom"}, endpoint="custom"
    )
    return inference_response(outcome.results[0].output, outcome)


ROUTES = [custom]
