"""The playground: a request body for one endpoint, run by that endpoint's own work function
(the table batch jobs use), answered as JSON with the equivalent curl command. Generation
streams through the same Inference.stream and server-sent events as /v1/text-generation."""

from __future__ import annotations

import json
import shlex
import time
from typing import Any

import msgspec
from litestar import Request, Response, post
from litestar.response import ServerSentEvent

from appliance.api import generation
from appliance.api.models import TASK_ENDPOINTS
from appliance.api.recorder import Observer
from appliance.api.tasks import Work
from appliance.classifiers import ClassifierStore
from appliance.config import Settings
from appliance.console.web import Console
from appliance.errors import ApplianceError, ValidationFailed, error_body, request_id_of
from appliance.gateway.auth import current_key
from appliance.inference import Call, Inference
from appliance.jobs.endpoints import JOB_ENDPOINTS

TEXT = "The appliance answers on premises, with no network."
SAMPLES: dict[str, dict[str, Any]] = {
    "/v1/text-vectorisation": {"text": TEXT},
    "/v1/embeddings": {"input": TEXT},
    "/v1/text-classification": {"text": TEXT, "labels": ["privacy", "cloud", "weather"]},
    "/v1/classify": {"text": TEXT, "labels": ["privacy", "cloud", "weather"]},
    "/v1/tag": {"text": TEXT, "labels": ["privacy", "cloud", "weather"]},
    "/v1/emotion": {"text": "I love how fast this is!"},
    "/v1/qa": {"question": "Where does it answer?", "context": TEXT},
    "/v1/text-generation": {"text": "Once upon a time", "max_length": 20},
    "/v1/summarisation": {"text": TEXT},
    "/v1/rerank": {"query": "offline", "documents": [TEXT, "It needs the cloud."]},
}


def endpoints_for(task: str | None) -> list[str]:
    """The /v1 endpoints a model of `task` answers that have a work function."""
    paths = [f"/v1/{name}" for name in TASK_ENDPOINTS.get(task or "", [])]
    return [p for p in paths if p in JOB_ENDPOINTS]


def curl(request: Request[Any, Any, Any], path: str, body: dict[str, Any]) -> str:
    base = str(request.base_url).rstrip("/")
    payload = json.dumps(body, ensure_ascii=False)
    return (
        f"curl -sS {shlex.quote(base + path)} \\\n"
        '  -H "Authorization: Bearer $APPLIANCE_KEY" \\\n'
        "  -H 'Content-Type: application/json' \\\n"
        f"  -d {shlex.quote(payload)}"
    )


async def _body(request: Request[Any, Any, Any]) -> tuple[str, dict[str, Any]]:
    form = await request.form()
    path = str(form.get("endpoint", ""))
    if path not in JOB_ENDPOINTS:
        raise ValidationFailed(f"Unknown endpoint '{path}'.", details={"field": "endpoint"})
    try:
        body = json.loads(str(form.get("body", "")) or "{}")
    except json.JSONDecodeError as exc:
        raise ValidationFailed(
            f"The body is not valid JSON: {exc}.", details={"field": "body"}
        ) from None
    if not isinstance(body, dict):
        raise ValidationFailed("The body must be a JSON object.", details={"field": "body"})
    model = str(form.get("model", ""))
    fields = msgspec.structs.fields(JOB_ENDPOINTS[path].endpoint.body)
    if model and any(f.name == "model" for f in fields):
        body["model"] = model
    return path, body


def _decode(path: str, body: dict[str, Any]) -> Any:
    """The body as the endpoint's handler would receive it (the same struct, strict JSON)."""
    try:
        return msgspec.json.decode(json.dumps(body), type=JOB_ENDPOINTS[path].endpoint.body)
    except msgspec.ValidationError as exc:
        raise ValidationFailed(str(exc), details={"field": "body"}) from None


@post("/console/playground/run", opt={"console": "predict"})
async def run(
    request: Request[Any, Any, Any],
    console: Console,
    inference: Inference,
    settings: Settings,
    classifiers: ClassifierStore,
    observer: Observer,
) -> Response[str]:
    path, body = await _body(request)
    command = curl(request, path, body)
    call = Call.for_request(current_key(request))
    request.state.call = call  # what the usage record reads: model, tokens, cache
    start = time.perf_counter()
    status, answer, error = 200, None, None
    try:
        data = _decode(path, body)
        if getattr(data, "stream", False):
            raise ValidationFailed(
                "Use the Stream button for `stream: true`.", details={"field": "stream"}
            )
        work = Work(call, inference, settings, classifiers)
        result, outcome = await JOB_ENDPOINTS[path].endpoint.run(data, work)
        answer = {
            "response": msgspec.to_builtins(result),
            "model": outcome.model.slug,
            "tokens": outcome.tokens,
            "cache": outcome.cache_status,
            "latency_ms": round(outcome.latency_ms, 2),
        }
    except ApplianceError as exc:
        status = exc.status_code
        error = error_body(
            exc.code, exc.message, details=exc.details, request_id=request_id_of(request)
        )
    # A playground run is API use: recorded like one (console pages themselves are not).
    observer(request.scope, status, time.perf_counter() - start)
    text = json.dumps(answer["response"] if answer else error, indent=2, ensure_ascii=False)
    return console.page(
        request,
        "playground_result.html",
        status=200,
        answer=answer,
        error=error,
        status_code=status,
        text=text,
        curl=command,
    )


@post("/console/playground/stream", opt={"console": "predict"})
async def stream(
    request: Request[Any, Any, Any], inference: Inference, settings: Settings
) -> ServerSentEvent:
    """Generation as /v1/text-generation streams it: `piece` events, then `done`."""
    path, body = await _body(request)
    if path != "/v1/text-generation":
        raise ValidationFailed("Only text generation streams.", details={"field": "endpoint"})
    body["stream"] = True
    data = _decode(path, body)
    if isinstance(data.text, list):
        raise ValidationFailed("`stream` works with one text, not a list.")
    call = Call.for_request(current_key(request))
    request.state.call = call
    _, _, events = await inference.stream(
        data.model,
        {"text": data.text, **data.parameters()},
        call=call,
        tasks=generation.TASKS,
        truncate=data.truncate,
        endpoint=generation.ENDPOINT,
    )
    return ServerSentEvent(generation.sse(events, request_id_of(request)))


ROUTES = [run, stream]
