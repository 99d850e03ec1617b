"""The models API (seeds/models-predict-api.txt): list, details, one-input predict."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, delete, get, post, put

from appliance.api.docs import raw_body
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
from appliance.errors import BatchNotSupported, ModelNotFound, ValidationFailed, request_id_of
from appliance.gateway.auth import current_key
from appliance.inference import Inference
from appliance.models.builds import SLUG, Builds
from appliance.models.registry import ModelEntry, Registry

# The task-API endpoints a model of each task answers.
TASK_ENDPOINTS = {
    "feature-extraction": [
        "text-vectorisation",
        "embeddings",
        "text-classification",
        "classify",
        "tag",
        "emotion",
    ],
    "text-classification": ["text-classification", "classify", "tag", "emotion"],
    "zero-shot-classification": ["text-classification", "classify", "tag", "emotion"],
    "question-answering": ["qa"],
    "text-generation": ["text-generation"],
    "summarisation": ["summarisation"],
    "zero-shot-image-classification": [
        "image-classification",
        "image-vectorisation",
        "text-vectorisation",
    ],
    "image-classification": ["image-classification"],
    "custom": ["custom"],
}


def _code(slug: str) -> str:
    return slug.upper().replace("-", "_")


def _visible(request: Request[Any, Any, Any], registry: Registry) -> list[ModelEntry]:
    """A key limited to some models sees only those (admins see all: their scope allows it)."""
    key = current_key(request)
    return [e for e in registry.entries() if key.allows_model(e.slug)]


def _allowed(request: Request[Any, Any, Any], registry: Registry, ref: str) -> ModelEntry:
    entry = registry.get(ref)
    if not current_key(request).allows_model(entry.slug):
        # The same 404 as an unknown model: a key does not learn what else is installed.
        raise ModelNotFound(f"Model '{ref}' not found.", details={"model": ref})
    return entry


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
        id=entry.slug,
        created=_created(entry),
    )


def _created(entry: ModelEntry) -> int:
    """Unix time the model was exported (manifest), else when its folder last changed."""
    m = entry.manifest
    if m and m.created_at:
        try:
            return int(datetime.fromisoformat(m.created_at.replace("Z", "+00:00")).timestamp())
        except ValueError:
            pass
    try:
        return int(entry.folder.stat().st_mtime)
    except OSError:
        return 0


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
async def list_models(
    request: Request[Any, Any, Any], registry: Registry, include_global: bool = True
) -> ModelList:
    """Models installed on this appliance, including ones that failed to load (with why)."""
    return ModelList(data=[summary(e) for e in _visible(request, registry)])


@get(
    ["/api/v1/models/{slug:str}", "/v1/models/{slug:str}"],
    opt={"scope": "predict"},
    tags=["models"],
)
async def get_model(
    request: Request[Any, Any, Any], slug: str, registry: Registry, inference: Inference
) -> ModelDetailEnvelope | PredictResponse:
    """One model's details, example payload and the fidelity measured at export. With query
    parameters giving its input (`?text=Hello+world`), runs the model instead and answers
    as POST .../predict does (`truncate=false` as there)."""
    return await _details_or_run(
        request, slug, registry, inference, lambda e: ModelDetailEnvelope(data=detail(e))
    )


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
    return await _predict(slug, data.input, data.truncate, request, inference)


async def _predict(
    slug: str, payload: Any, truncate: bool, request: Request[Any, Any, Any], inference: Inference
) -> Response[PredictResponse]:
    """The predict route's work, shared by its GET form (query parameters as the input)."""
    if isinstance(payload, list):
        raise BatchNotSupported()
    outcome = await inference.run(slug, [payload], call=call_for(request), truncate=truncate)
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


# ---- the endpoint API's GET form (seeds/endpoint-api.txt) ---------------------------------
# GET /models/sentiment?text=Hello+world runs the model; without query parameters the same
# paths answer the model's details. `truncate` is the predict option and `include_global` the
# task API's listing flag (clients send it on details too): neither is an input field.
OPTIONS = {"truncate", "include_global"}


def _query_value(field: str, values: list[str], example: Any) -> Any:
    """A query parameter as the input field the model takes. Query values are strings, so the
    model's example payload decides: a field it gives as a number, boolean or list is
    converted to one; one it gives as text stays text; other fields (e.g. generation's
    temperature) take a JSON number or boolean when they spell one."""
    if isinstance(example, list):
        return values
    if len(values) > 1:
        return values  # several values for one field: a batch, refused as predict refuses it
    value = values[0]
    if isinstance(example, str):
        return value
    if example is None:
        try:
            parsed = json.loads(value)
        except ValueError:
            return value
        return parsed if isinstance(parsed, (int, float, bool)) else value
    try:
        if isinstance(example, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        if isinstance(example, int):
            return int(value)
        if isinstance(example, float):
            return float(value)
    except ValueError:
        raise ValidationFailed(
            f"`{field}` must be a {type(example).__name__}, not {value!r}.",
            details={"field": field},
        ) from None
    return value


def _query_input(
    request: Request[Any, Any, Any], entry: ModelEntry
) -> tuple[dict[str, Any], bool] | None:
    """(input, truncate) from the query string; None when it gives no input field."""
    params = request.query_params
    fields = [name for name in params if name not in OPTIONS]
    if not fields:
        return None
    example = entry.manifest.example_payload if entry.manifest else {}
    payload = {f: _query_value(f, params.getall(f), example.get(f)) for f in fields}
    truncate = params.get("truncate", "true").lower() not in ("false", "0")
    return payload, truncate


async def _details_or_run(
    request: Request[Any, Any, Any],
    ref: str,
    registry: Registry,
    inference: Inference,
    details: Callable[[ModelEntry], Any],
) -> Any:
    entry = _allowed(request, registry, ref)
    given = _query_input(request, entry)
    if given is None:
        return details(entry)
    return await _predict(ref, given[0], given[1], request, inference)


@delete(
    ["/v1/models/{slug:str}", "/api/v1/models/{slug:str}"],
    opt={"scope": "admin"},
    tags=["models"],
    status_code=200,
)
async def delete_model(slug: str, registry: Registry, builds: Builds) -> dict[str, Any]:
    """Stop serving a model (in-flight requests finish), free it and delete its files; a
    build of it under way is cancelled (its exporter killed)."""
    await builds.cancel(slug)
    await registry.remove(slug, delete_files=True)
    return {"slug": slug, "deleted": True}


# ---- the task API's model routes (seeds/task-api.txt) ------------------------------------
def task_api_model(entry: ModelEntry, *, detailed: bool = False) -> dict[str, Any]:
    m = entry.manifest
    out: dict[str, Any] = {
        "id": f"model_{entry.slug}",
        "name": entry.slug,
        "description": m.description if m else "",
        "tasks": TASK_ENDPOINTS.get(m.task, []) if m else [],
        "build_status": entry.build_status,
        "last_deployment": m.created_at if m else None,
    }
    if detailed:
        # The hosted API links its storage; here the files are local, so there is no URL.
        out |= {
            "build_message": entry.message or "ready",
            "model_url": None,
            "config_url": None,
            "requirements_url": None,
        }
    return out


class TaskApiModelDetail(msgspec.Struct):
    """task_api_model(detailed=True) as a type, so the document tells it from a run's answer."""

    id: str
    name: str
    description: str
    tasks: list[str]
    build_status: str
    last_deployment: str | None
    build_message: str
    model_url: str | None
    config_url: str | None
    requirements_url: str | None


@get("/models", opt={"scope": "predict"}, tags=["tasks"])
async def task_api_models(
    request: Request[Any, Any, Any], registry: Registry, include_global: bool = True
) -> list[dict[str, Any]]:
    """Models as the task API lists them: [{id, name, description, tasks, build_status,
    last_deployment}]."""
    return [task_api_model(e) for e in _visible(request, registry)]


@get("/models/{model:str}", opt={"scope": "predict"}, tags=["tasks"])
async def task_api_model_detail(
    request: Request[Any, Any, Any], model: str, registry: Registry, inference: Inference
) -> TaskApiModelDetail | PredictResponse:
    """One model, with its build message. With query parameters giving its input (the
    endpoint API's `GET /models/sentiment?text=Hello+world`), runs the model and answers as
    POST /v1/models/{model}/predict does."""
    return await _details_or_run(
        request,
        model,
        registry,
        inference,
        lambda e: TaskApiModelDetail(**task_api_model(e, detailed=True)),
    )


@delete("/models/{model:str}", opt={"scope": "admin"}, tags=["tasks"], status_code=200)
async def task_api_delete(model: str, registry: Registry, builds: Builds) -> None:
    """Delete a model (the task API answers null)."""
    await builds.cancel(model)
    await registry.remove(model, delete_files=True)


# ---- adding models while serving ---------------------------------------------------------
class UploadUrlBody(msgspec.Struct, kw_only=True):
    # The slug rule Builds enforces, in the struct so the OpenAPI document states it.
    model_name: Annotated[str, msgspec.Meta(pattern=SLUG.pattern)]
    task: str | None = None
    """The checkpoint's task, when its config does not make it clear."""


def _accepted(slug: str, status: str) -> Response[dict[str, Any]]:
    body = {
        "data": {
            "slug": slug,
            "build_status": status,
            "call_url": f"/api/v1/models/{slug}/predict",
        }
    }
    return Response(body, status_code=202)


@post(
    ["/v1/models", "/api/v1/models"],
    opt={"scope": "admin"},
    tags=["models"],
    request_max_body_size=None,  # streamed to disk under models.max_upload_bytes
    operation_class=raw_body(
        "application/zip", "An exported model folder or a checkpoint, zipped."
    ),
)
async def upload_model(
    request: Request[Any, Any, Any], builds: Builds, name: str, task: str | None = None
) -> Response[dict[str, Any]]:
    """Add a model: the body is a zip (Content-Type application/zip) of an exported model
    folder or of a Hugging Face checkpoint, which is exported and quantised in the
    background, one build at a time. 202 with build_status "building" (or "queued" behind
    another build); poll GET /v1/models/{name}. 501 EXPORT_UNAVAILABLE for a checkpoint when
    the exporter (the `export` extra) is not installed."""
    return _accepted(name, await builds.receive(request.stream(), name, task))


@post(
    "/upload-url",
    opt={"scope": "admin"},
    tags=["tasks"],
    status_code=200,
    media_type="application/json",
)
async def upload_url(
    data: UploadUrlBody, request: Request[Any, Any, Any], builds: Builds
) -> Response[bytes]:
    """A URL on this appliance, valid for an hour, that takes the model zip by PUT (the
    answer is the URL as a JSON string, as the task API gives it)."""
    token = builds.grant(data.model_name, data.task)
    url = f"{str(request.base_url).rstrip('/')}/uploads/{token}"
    return Response(msgspec.json.encode(url), media_type="application/json")


@put(
    "/uploads/{token:str}",
    tags=["tasks"],
    request_max_body_size=None,
    operation_class=raw_body("application/zip", "The model zip."),
)
async def upload_by_url(
    token: str, request: Request[Any, Any, Any], builds: Builds
) -> Response[dict[str, Any]]:
    """PUT the zip to a URL from POST /upload-url (the URL itself is the credential)."""
    grant = builds.redeem(token)
    return _accepted(grant.slug, await builds.receive(request.stream(), grant.slug, grant.task))


ROUTES = [
    upload_model,
    upload_url,
    upload_by_url,
    list_models,
    get_model,
    predict,
    delete_model,
    task_api_models,
    task_api_model_detail,
    task_api_delete,
]
