"""POST /v1/embeddings in OpenAI's wire format, since most embedding clients speak it."""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

import msgspec
import numpy as np
from litestar import Request, Response, post

from appliance.api.responses import inference_response
from appliance.api.schemas import Texts
from appliance.api.tasks import VECTORISE, Endpoint, Work, as_batch, work_of
from appliance.errors import ValidationFailed
from appliance.inference import Outcome


class EmbeddingsBody(msgspec.Struct, kw_only=True):
    input: str | Texts
    """A text or a list of texts (token-id arrays are not accepted: tokenizers differ)."""
    model: str = "english"
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """Keep the first N dimensions and re-normalise (for models trained for it)."""
    user: str | None = None


def _texts(value: str | list[Any], limit: int) -> list[str]:
    texts, _ = as_batch(value, "input", limit)
    if any(isinstance(t, (int, list)) for t in texts):
        raise ValidationFailed(
            "`input` must be text: token-id arrays are not accepted by this server.",
            details={"field": "input"},
        )
    return texts


def _encode(vector: list[float], dimensions: int | None, fmt: str) -> list[float] | str:
    v = np.asarray(vector, dtype=np.float32)
    if dimensions is not None:
        if not 1 <= dimensions <= v.shape[0]:
            raise ValidationFailed(
                f"`dimensions` must be between 1 and {v.shape[0]}.", details={"field": "dimensions"}
            )
        v = v[:dimensions]
        v = v / max(float(np.linalg.norm(v)), 1e-12)
    if fmt == "base64":
        return base64.b64encode(v.astype("<f4").tobytes()).decode()
    return v.tolist()  # type: ignore[no-any-return]


@post("/v1/embeddings", opt={"scope": "predict"}, tags=["openai"], status_code=200)
async def embeddings(
    data: EmbeddingsBody, request: Request[Any, Any, Any]
) -> Response[dict[str, Any]]:
    """{object: "list", data: [{object: "embedding", embedding, index}], model, usage}."""
    work = work_of(request)
    return inference_response(*await embed(data, work))


async def embed(data: EmbeddingsBody, work: Work) -> tuple[dict[str, Any], Outcome]:
    """The work of POST /v1/embeddings (batch jobs run it per line too)."""
    texts = _texts(data.input, work.settings.server.max_batch_items)
    outcome = await work.inference.run(
        data.model,
        [{"text": t} for t in texts],
        call=work.call,
        tasks=VECTORISE,
        endpoint="embeddings",
        priority=work.priority,
    )
    items = [
        {
            "object": "embedding",
            "index": i,
            "embedding": _encode(r.output["vector"], data.dimensions, data.encoding_format),
        }
        for i, r in enumerate(outcome.results)
    ]
    body = {
        "object": "list",
        "data": items,
        "model": outcome.model.slug,
        "usage": {"prompt_tokens": outcome.tokens, "total_tokens": outcome.tokens},
    }
    return body, outcome


ROUTES = [embeddings]
ENDPOINTS: dict[str, Endpoint] = {"/v1/embeddings": Endpoint(EmbeddingsBody, embed)}
