"""The models API (seeds/models-predict-api.txt): list, details, one-input predict."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, get, post

from appliance.api.responses import call_for, inference_response
from appliance.api.schemas import (
    ModelDetail,
    ModelDetailEnvelope,
    ModelList,
    ModelRef,
    ModelSummary,
    PredictBody,
    PredictMeta,
    PredictResponse,
)
from appliance.errors import BatchNotSupported, request_id_of
from appliance.inference import Inference
from appliance.models.registry import ModelEntry, Registry

# The task-API endpoints a model of each task answers.
TASK_ENDPOINTS = {
    "feature-extraction": ["text-vectorisation", "embeddings"],
    "text-classification": ["classify"],
}


def _code(slug: str) -> str:
    return slug.upper().replace("-", "_")


def summary(entry: ModelEntry) -> ModelSummary:
    m = entry.manifest
    return ModelSummary(
        code=m.code if m else _code(entry.slug),
        name=m.name if m else entry.slug,
        slug=entry.slug,
        task=m.task if m else None,
        call_url=f"/api/v1/models/{entry.slug}/predict",
        is_active=entry.is_active,
        build_status=entry.build_status,
        description=m.description if m else "",
        tasks=TASK_ENDPOINTS.get(m.task, []) if m else [],
    )


def detail(entry: ModelEntry) -> ModelDetail:
    m = entry.manifest
    return ModelDetail(
        **msgspec.structs.asdict(summary(entry)),
        example_payload=m.example_payload if m else {},
        labels=m.labels if m else None,
        dimension=m.dimension if m else None,
        max_tokens=m.max_tokens if m else None,
        quantization=msgspec.to_builtins(m.quantization) if m else None,
        size_bytes=m.size_bytes if m else 0,
        build_message=entry.message or ("ready" if entry.is_active else ""),
        validation=msgspec.to_builtins(m.validation) if m and m.validation else None,
    )


@get(["/api/v1/models", "/v1/models"], opt={"scope": "predict"}, tags=["models"])
async def list_models(registry: Registry, include_global: bool = True) -> ModelList:
    """Models installed on this appliance, including ones that failed to load (with why)."""
    return ModelList(data=[summary(e) for e in registry.entries()])


@get(
    ["/api/v1/models/{slug:str}", "/v1/models/{slug:str}"],
    opt={"scope": "predict"},
    tags=["models"],
)
async def get_model(slug: str, registry: Registry) -> ModelDetailEnvelope:
    """One model's details, example payload and the fidelity measured at export."""
    return ModelDetailEnvelope(data=detail(registry.get(slug)))


@post(
    ["/api/v1/models/{slug:str}/predict", "/v1/models/{slug:str}/predict"],
    opt={"scope": "predict"},
    tags=["models"],
    status_code=200,
)
async def predict(
    slug: str, data: PredictBody, request: Request[Any, Any, Any], inference: Inference
) -> Response[PredictResponse]:
    """Run a model on one input. A list (batch) is refused with 422 BATCH_NOT_SUPPORTED."""
    if isinstance(data.input, list):
        raise BatchNotSupported()
    outcome = await inference.run(
        slug, [data.input], call=call_for(request), truncate=data.truncate
    )
    entry = outcome.model
    assert entry.manifest is not None
    result = outcome.results[0]
    body = PredictResponse(
        request_id=request_id_of(request),
        model=ModelRef(code=entry.manifest.code, name=entry.manifest.name),
        output=result.output,
        meta=PredictMeta(
            status=200,
            latency_ms=round(outcome.latency_ms, 2),
            tokens=outcome.tokens,
            cached=outcome.cached,
            truncated=outcome.truncated,
        ),
    )
    return inference_response(body, outcome)
