"""Rerank: POST /rerank in Hugging Face TEI's shape, POST /v1/rerank in Cohere's and Jina's.

A cross-encoder (task text-ranking) scores each (query, text) pair: `score` is the sigmoid of
its logit (the logit itself with TEI's raw_scores). An embedding model can rerank too, by the
cosine similarity of the query's and each text's vectors: the weaker choice (the texts are
encoded without the query). Without `model`: the first text-ranking model, else the first
embedding model (config [defaults] reranker overrides). Every pair is charged.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import msgspec
import numpy as np
from litestar import Request, Response, post

from appliance.api.responses import inference_response
from appliance.api.schemas import Text
from appliance.api.tasks import Endpoint, Work, as_batch, work_of
from appliance.api.tei import default_model
from appliance.inference import Outcome

CROSS_ENCODER, EMBEDDING = "text-ranking", "feature-extraction"


Passages = Annotated[list[Text], msgspec.Meta(min_length=1)]
"""Blank texts are refused (an embedding model could not encode them)."""


class TEIRerankBody(msgspec.Struct, kw_only=True):
    query: Text
    texts: Passages
    raw_scores: bool = False
    """The logit instead of its sigmoid (cross-encoders; cosine is cosine either way)."""
    return_text: bool = False
    truncate: bool = True
    """Cut pairs longer than the model takes (X-Truncated says so); false: 422 instead."""
    model: str | None = None


class Rank(msgspec.Struct, omit_defaults=True):
    index: int
    score: float
    text: str | None = None


class Document(msgspec.Struct):
    text: Text


class RerankBody(msgspec.Struct, kw_only=True):
    query: Text
    documents: Annotated[list[Text | Document], msgspec.Meta(min_length=1)]
    model: str | None = None
    top_n: Annotated[int, msgspec.Meta(ge=1)] | None = None
    return_documents: bool = False
    truncate: bool = True


class Result(msgspec.Struct, omit_defaults=True):
    index: int
    relevance_score: float
    document: Document | None = None


class Usage(msgspec.Struct):
    total_tokens: int


class RerankResponse(msgspec.Struct):
    model: str
    results: list[Result]
    usage: Usage


async def scores(
    query: str, texts: list[str], model: str | None, truncate: bool, work: Work, field: str
) -> tuple[list[float], bool, Outcome]:
    """(one score per text, whether they are logits, the outcome); `field`: where the texts
    are in the body, for the 422 over server.max_batch_items, as every batch route has."""
    as_batch(texts, field, work.settings.server.max_batch_items)
    slug = model or default_model(work, "reranker")
    entry = work.inference.registry.resolve(slug, "rerank")
    embedding = entry.manifest is not None and entry.manifest.task == EMBEDDING
    run = work.inference.run
    common: dict[str, Any] = {
        "call": work.call,
        "truncate": truncate,
        "endpoint": "rerank",
        "priority": work.priority,
    }
    if not embedding:  # a cross-encoder, or the 422 naming the tasks that rerank
        outcome = await run(
            slug, [{"query": query, "texts": texts}], tasks={CROSS_ENCODER}, **common
        )
        return outcome.results[0].output["logits"], True, outcome
    outcome = await run(slug, [{"text": t} for t in (query, *texts)], tasks={EMBEDDING}, **common)
    vectors = np.array([r.output["vector"] for r in outcome.results], dtype=np.float64)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-12
    return [float(x) for x in vectors[1:] @ vectors[0]], False, outcome


def _score(value: float, logit: bool) -> float:
    return 1.0 / (1.0 + math.exp(-value)) if logit else value


async def tei_rerank(data: TEIRerankBody, work: Work) -> tuple[list[Rank], Outcome]:
    raw, logits, outcome = await scores(
        data.query, data.texts, data.model, data.truncate, work, "texts"
    )
    ranks = [
        Rank(
            index=i,
            score=value if data.raw_scores else _score(value, logits),
            text=data.texts[i] if data.return_text else None,
        )
        for i, value in enumerate(raw)
    ]
    return sorted(ranks, key=lambda r: r.score, reverse=True), outcome


async def cohere_rerank(data: RerankBody, work: Work) -> tuple[RerankResponse, Outcome]:
    texts = [d if isinstance(d, str) else d.text for d in data.documents]
    raw, logits, outcome = await scores(
        data.query, texts, data.model, data.truncate, work, "documents"
    )
    results = sorted(
        (
            Result(
                index=i,
                relevance_score=_score(value, logits),
                document=Document(texts[i]) if data.return_documents else None,
            )
            for i, value in enumerate(raw)
        ),
        key=lambda r: r.relevance_score,
        reverse=True,
    )[: data.top_n]
    return RerankResponse(outcome.model.slug, results, Usage(outcome.tokens)), outcome


@post("/rerank", opt={"scope": "predict"}, tags=["rerank"], status_code=200)
async def rerank_tei(data: TEIRerankBody, request: Request[Any, Any, Any]) -> Response[list[Rank]]:
    """TEI's rerank: the texts' indexes and scores, highest first."""
    work = work_of(request)
    return inference_response(*await tei_rerank(data, work))


@post("/v1/rerank", opt={"scope": "predict"}, tags=["rerank"], status_code=200)
async def rerank_v1(data: RerankBody, request: Request[Any, Any, Any]) -> Response[RerankResponse]:
    """Cohere's and Jina's rerank: results highest first, `top_n` of them, and the tokens."""
    work = work_of(request)
    return inference_response(*await cohere_rerank(data, work))


ROUTES = [rerank_tei, rerank_v1]
ENDPOINTS: dict[str, Endpoint] = {
    "/rerank": Endpoint(TEIRerankBody, tei_rerank),
    "/v1/rerank": Endpoint(RerankBody, cohere_rerank),
}
