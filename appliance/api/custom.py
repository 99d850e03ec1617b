"""POST /v1/custom and /custom: a user-exported custom model, fields mapped to its inputs."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, post

from appliance.api.responses import inference_response
from appliance.api.schemas import NonEmpty
from appliance.api.tasks import work_of


class CustomBody(msgspec.Struct):
    """`model` and, beside it, one field per input of the model (named as its manifest says)."""

    model: NonEmpty
    """The custom model's slug."""


@post(["/v1/custom", "/custom"], opt={"scope": "predict"}, tags=["tasks"], status_code=200)
async def custom(data: CustomBody, request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    """{"model": slug, <input name>: value, ...} -> {"output": ...}: each field named like one
    of the model's inputs (GET /v1/models/{slug} shows them) becomes that input."""
    work = work_of(request)
    model = data.model
    # The struct states and checks `model`; the inputs are the body's other fields, whatever
    # the model names them (the body is parsed once: litestar keeps it).
    fields = {k: v for k, v in (await request.json()).items() if k != "model"}
    outcome = await work.inference.run(
        model, [fields], call=work.call, tasks={"custom"}, endpoint="custom"
    )
    return inference_response(outcome.results[0].output, outcome)


ROUTES = [custom]
