"""Request and response bodies, as msgspec structs: litestar validates them and documents them
in /openapi.json."""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class PredictBody(msgspec.Struct, kw_only=True):
    input: Any
    """One input object; its fields depend on the model's task (e.g. {"text": "..."})."""
    truncate: bool = True
    """Cut inputs longer than the model's max tokens (the response says so); false: 422."""


class ModelRef(msgspec.Struct):
    code: str
    name: str


class PredictMeta(msgspec.Struct):
    status: int
    latency_ms: float
    tokens: int
    cached: bool
    truncated: bool


class PredictResponse(msgspec.Struct):
    request_id: str | None
    model: ModelRef
    output: dict[str, Any]
    meta: PredictMeta


class ModelSummary(msgspec.Struct, kw_only=True):
    code: str
    name: str
    slug: str
    task: str | None
    call_url: str
    is_active: bool
    build_status: str
    description: str
    tasks: list[str]
    # OpenAI's model object, so OpenAI-compatible clients listing /v1/models see each model.
    id: str = ""
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "appliance"


class ModelDetail(ModelSummary):
    example_payload: dict[str, Any]
    labels: list[str] | None
    dimension: int | None
    max_tokens: int | None
    quantization: dict[str, Any] | None
    size_bytes: int
    build_message: str
    validation: dict[str, Any] | None


class ModelList(msgspec.Struct):
    data: list[ModelSummary]
    object: Literal["list"] = "list"


class ModelDetailEnvelope(msgspec.Struct):
    data: ModelDetail
