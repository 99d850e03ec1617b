"""POST /v1/summarisation and /summarisation (seeds/task-api.txt): a summary of a text, or of
each text of a list (batch: a list of summaries in the same order).

The work is a plain async function of the body and a `Work`, as in appliance.api.tasks, so a
batch job can run the very same code (`ENDPOINTS`)."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, post

from appliance.api.responses import inference_response
from appliance.api.schemas import Texts
from appliance.api.tasks import Endpoint, Work, as_batch, one_or_list, work_of
from appliance.inference import Outcome

TASKS = {"summarisation"}
PARAMETERS = (
    "min_length",
    "max_length",
    "num_beams",
    "length_penalty",
    "no_repeat_ngram_size",
    "repetition_penalty",
)


class SummarisationBody(msgspec.Struct, kw_only=True):
    text: str | Texts
    """A text, or a list of texts (batch: the answer is a list in the same order)."""
    model: str = "english"
    """A model slug or an alias from config."""
    min_length: int | None = None
    """Fewest tokens in the summary (default: the model's)."""
    max_length: int | None = None
    """Most tokens in the summary (default: the model's)."""
    num_beams: int | None = None
    """Beam search width (1: greedy)."""
    length_penalty: float | None = None
    """Beam search: above 1 favours longer summaries, below 1 shorter ones."""
    no_repeat_ngram_size: int | None = None
    """No n-gram of this size appears twice in a summary (0: no limit)."""
    repetition_penalty: float | None = None
    """Above 1 penalises tokens already in the summary."""
    truncate: bool = True
    """Cut texts longer than the model's max tokens (X-Truncated says so); false: 422."""

    def parameters(self) -> dict[str, Any]:
        return {p: v for p in PARAMETERS if (v := getattr(self, p)) is not None}


class SummarisationResponse(msgspec.Struct):
    output: str | list[str]
    """The summary, or (for a list of texts) the summaries in the same order."""


@post(
    ["/v1/summarisation", "/summarisation"],
    opt={"scope": "predict"},
    tags=["tasks"],
    status_code=200,
)
async def summarisation(
    data: SummarisationBody,
    request: Request[Any, Any, Any],
) -> Response[SummarisationResponse]:
    """Summarise a text, or each text of a list, with a seq2seq model (T5, BART, ...)."""
    work = work_of(request)
    return inference_response(*await summarise(data, work))


async def summarise(data: SummarisationBody, work: Work) -> tuple[SummarisationResponse, Outcome]:
    """The work of /v1/summarisation."""
    texts, batch = as_batch(data.text, "text", work.settings.server.max_batch_items)
    parameters = data.parameters()
    outcome = await work.inference.run(
        data.model,
        [{"text": t, **parameters} for t in texts],
        call=work.call,
        tasks=TASKS,
        truncate=data.truncate,
        endpoint="summarisation",
        priority=work.priority,
    )
    summaries = [r.output["output"] for r in outcome.results]
    return SummarisationResponse(one_or_list(summaries, batch)), outcome


ROUTES = [summarisation]

_SUMMARISE = Endpoint(SummarisationBody, summarise)
ENDPOINTS: dict[str, Endpoint] = {
    "/v1/summarisation": _SUMMARISE,
    "/summarisation": _SUMMARISE,
}
"""This module's paths to their body type and work (for batch jobs)."""
