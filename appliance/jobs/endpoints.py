"""The endpoints a batch job may target: each path's body type and the same work function its
real-time handler runs, plus the name its per-endpoint model aliases are kept under."""

from __future__ import annotations

from typing import Any, NamedTuple

from appliance.api import classify, openai, tasks
from appliance.api.tasks import VECTORISE, Endpoint, Work
from appliance.inference import Outcome


async def embed(data: openai.EmbeddingsBody, work: Work) -> tuple[dict[str, Any], Outcome]:
    """The work of POST /v1/embeddings (OpenAI's shape), as its handler does it."""
    texts = openai._texts(data.input, work.settings.server.max_batch_items)
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
            "embedding": openai._encode(r.output["vector"], data.dimensions, data.encoding_format),
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


class JobEndpoint(NamedTuple):
    path: str
    endpoint: Endpoint
    alias_scope: str
    """The endpoint name its model aliases are looked up under (config endpoint_aliases)."""

    @property
    def takes_classifier(self) -> bool:
        return "classifier" in getattr(self.endpoint.body, "__struct_fields__", ())


def _alias_scope(path: str) -> str:
    name = path.removeprefix("/v1/").strip("/").split("/")[0]
    return "classify" if name == "tag" else name  # the classify API shares one alias scope


_ALL: dict[str, Endpoint] = {
    **tasks.ENDPOINTS,
    **classify.ENDPOINTS,
    "/v1/embeddings": Endpoint(openai.EmbeddingsBody, embed),
}

JOB_ENDPOINTS: dict[str, JobEndpoint] = {
    path: JobEndpoint(path, endpoint, _alias_scope(path)) for path, endpoint in _ALL.items()
}
"""Every endpoint path a job may name, to how its lines are run."""
