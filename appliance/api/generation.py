"""Task API endpoints for generation models: text generation (seeds/task-api.txt).

`text` is one prompt or a list (batch: a list of outputs in the same order). With
`"stream": true` (one text, no beams, one generation) the answer is server-sent events: a
`piece` event per new piece of text, then `done` with the whole output (or `error`).
The non-streaming work is a function of the body and a `Work`, shared with batch jobs
(`ENDPOINTS`), as in appliance.api.tasks.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Request, Response, post
from litestar.response import ServerSentEvent
from litestar.response.sse import ServerSentEventMessage

from appliance.api.responses import inference_response
from appliance.api.schemas import Texts
from appliance.api.tasks import Endpoint, Work, as_batch, work_of
from appliance.errors import ApplianceError, ValidationFailed, error_body, request_id_of
from appliance.inference import Outcome

TASKS = {"text-generation"}
ENDPOINT = "text-generation"  # the name its per-endpoint model aliases are kept under
PARAMETERS = (
    "min_length",
    "max_length",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "length_penalty",
    "num_beams",
    "num_generations",
    "seed",
)


class TextGenerationBody(msgspec.Struct, kw_only=True):
    text: str | Texts
    """The prompt, or a list of prompts (batch: the answer is a list in the same order)."""
    model: str = "gpt2-large"
    """A model slug or an alias from config."""
    min_length: int | None = None
    """Minimum number of tokens to generate (default 0)."""
    max_length: int | None = None
    """Maximum number of tokens to generate (default 20)."""
    temperature: float | None = None
    """Above 0 samples (higher: more random); 0 is deterministic (greedy)."""
    top_k: int | None = None
    """Sample among the k most likely tokens; 0 considers all."""
    top_p: float | None = None
    """Sample among the most likely tokens whose probabilities add up to p."""
    repetition_penalty: float | None = None
    """Above 1 penalises tokens already in the text, below 1 encourages them."""
    length_penalty: float | None = None
    """Beam search: above 1 favours longer sequences, below 1 shorter ones."""
    num_beams: int | None = None
    """Beam search width (1: no beam search)."""
    num_generations: int | None = None
    """Outputs per prompt (above 1: `output` is a list)."""
    seed: int | None = None
    """Makes sampling reproducible (and cacheable)."""
    stream: bool = False
    """Answer with server-sent events as tokens are generated (one text, num_beams 1)."""
    truncate: bool = True
    """Cut a prompt too long for the model (keeping its end); false: 422."""

    def parameters(self) -> dict[str, Any]:
        return {p: v for p in PARAMETERS if (v := getattr(self, p)) is not None}


class TextGenerationResponse(msgspec.Struct):
    output: str | list[Any]
    """The prompt followed by its continuation; a list for several generations or a batch."""


@post(
    ["/v1/text-generation", "/text-generation"],
    opt={"scope": "predict"},
    tags=["tasks"],
    status_code=200,
)
async def text_generation(
    data: TextGenerationBody, request: Request[Any, Any, Any]
) -> Response[Any]:
    """Continue a text (or a list of texts) with a text-generation model."""
    work = work_of(request)
    if not data.stream:
        return inference_response(*await generate_texts(data, work))
    texts, batch = as_batch(data.text, "text", work.settings.server.max_batch_items)
    if batch:
        raise ValidationFailed(
            "`stream` works with one text, not a list.", details={"field": "stream"}
        )
    entry, limits, events = await work.inference.stream(
        data.model,
        {"text": texts[0], **data.parameters()},
        call=work.call,
        tasks=TASKS,
        truncate=data.truncate,
        endpoint=ENDPOINT,
    )
    headers = {"X-Cache": "BYPASS", "X-Model": entry.slug, **limits.headers()}
    return ServerSentEvent(sse(events, request_id_of(request)), headers=headers)


async def generate_texts(
    data: TextGenerationBody, work: Work
) -> tuple[TextGenerationResponse, Outcome]:
    """The work of /v1/text-generation (without streaming, which only the handler does)."""
    if data.stream:
        raise ValidationFailed(
            "`stream` is only answered over HTTP, not here.", details={"field": "stream"}
        )
    texts, batch = as_batch(data.text, "text", work.settings.server.max_batch_items)
    parameters = data.parameters()
    outcome = await work.inference.run(
        data.model,
        [{"text": t, **parameters} for t in texts],
        call=work.call,
        tasks=TASKS,
        truncate=data.truncate,
        endpoint=ENDPOINT,
        priority=work.priority,
    )
    outputs = [r.output["output"] for r in outcome.results]
    return TextGenerationResponse(output=outputs if batch else outputs[0]), outcome


async def sse(events: AsyncIterator[dict[str, Any]], request_id: str) -> AsyncIterator[Any]:
    """Inference.stream's events as server-sent events (JSON data)."""
    async for event in events:
        kind = event["event"]
        if kind == "piece":
            data: dict[str, Any] = {"text": event["text"]}
        elif kind == "done":
            result = event["result"]
            data = {**result.output, "tokens": result.tokens, "truncated": result.truncated}
        else:
            exc = event["error"]
            error = exc if isinstance(exc, ApplianceError) else ApplianceError()
            data = error_body(
                error.code, error.message, details=error.details, request_id=request_id
            )
        yield ServerSentEventMessage(event=kind, data=json.dumps(data, ensure_ascii=False))


ROUTES: list[Any] = [text_generation]

_GENERATE = Endpoint(TextGenerationBody, generate_texts)
ENDPOINTS: dict[str, Endpoint] = {"/v1/text-generation": _GENERATE, "/text-generation": _GENERATE}
"""Each path of this module to its body type and work (batch jobs run them per line)."""
