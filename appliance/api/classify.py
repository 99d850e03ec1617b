"""The classify API (seeds/classify-api.txt): single-label classification, multi-label tagging,
their batch forms, and saved classifiers. Texts, or base64 PDF/DOCX files, are classified
over the labels given (or a saved classifier's) by any model that can score labels.

As in appliance.api.tasks, each endpoint's work is a plain async function of its body and a
`Work`, shared by the handler and batch jobs (`ENDPOINTS`)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
from litestar import Request, Response, delete, get, post

from appliance.api.responses import inference_response
from appliance.api.schemas import Fraction, NonEmpty, Texts, check_one, exactly_one
from appliance.api.tasks import LABELS, Endpoint, Work, as_batch, work_of
from appliance.classifiers import Classifier, ClassifierStore
from appliance.errors import ValidationFailed
from appliance.gateway.auth import current_key
from appliance.inference import Outcome
from appliance.models.registry import Registry
from appliance.runtime.documents import documents

DEFAULT_TAG_THRESHOLD = 0.5


@exactly_one("text", "file")
class ClassifyBody(msgspec.Struct, kw_only=True):
    text: str | None = None
    file: NonEmpty | None = None
    """A base64 PDF or DOCX (at most 20 pages) instead of `text`."""
    labels: list[str] | None = None
    classifier: str | None = None
    """A saved classifier's name: its labels, model and threshold are the defaults."""
    model: str | None = None
    threshold: Fraction | None = None
    """classify: below it, `label` is null; tag: labels scoring at least this are returned."""


class BatchBody(msgspec.Struct, kw_only=True):
    texts: Texts
    labels: list[str] | None = None
    classifier: str | None = None
    model: str | None = None
    threshold: Fraction | None = None


class ClassifierBody(msgspec.Struct, kw_only=True):
    name: str
    labels: list[str]
    model: str = "english"
    description: str = ""
    multi_label: bool = False
    threshold: float = 0.5
    replace: bool = False


class _Plan(msgspec.Struct):
    model: str
    labels: list[str] | None
    threshold: float | None


def _plan(body: ClassifyBody | BatchBody, work: Work) -> _Plan:
    store = _store(work)
    saved = store.get(body.classifier, work.call.key) if body.classifier else None
    threshold = (
        body.threshold if body.threshold is not None else (saved.threshold if saved else None)
    )
    if threshold is not None and not 0 <= threshold <= 1:
        raise ValidationFailed(
            "`threshold` must be between 0 and 1.", details={"field": "threshold"}
        )
    return _Plan(
        model=body.model or (saved.model if saved else "english"),
        labels=body.labels if body.labels is not None else (saved.labels if saved else None),
        threshold=threshold,
    )


async def _text_of(body: ClassifyBody) -> str:
    if check_one(body) == "file":
        return await documents.extract_text(body.file)
    return body.text  # type: ignore[return-value]


def _classified(output: dict[str, Any], threshold: float | None) -> dict[str, Any]:
    confident = threshold is None or output["score"] >= threshold
    return {
        "label": output["label"] if confident else None,
        "confidence": output["score"],
        "scores": output["probabilities"],
    }


def _tagged(output: dict[str, Any], threshold: float | None) -> dict[str, Any]:
    cut = DEFAULT_TAG_THRESHOLD if threshold is None else threshold
    ranked = sorted(output["probabilities"].items(), key=lambda kv: kv[1], reverse=True)
    return {"labels": [label for label, p in ranked if p >= cut], "scores": output["probabilities"]}


async def _run(texts: list[str], plan: _Plan, multi: bool, work: Work) -> Outcome:
    payloads = [{"text": t, "labels": plan.labels, "multi_label": multi} for t in texts]
    return await work.inference.run(
        plan.model,
        payloads,
        call=work.call,
        tasks=LABELS,
        endpoint="classify",
        priority=work.priority,
    )


def _store(work: Work) -> ClassifierStore:
    assert work.classifiers is not None, "the classify API needs the saved classifiers"
    return work.classifiers


def _stats(outcome: Outcome, start: float) -> dict[str, Any]:
    return {"tokens": outcome.tokens, "latency_ms": round((time.perf_counter() - start) * 1000, 2)}


@post("/v1/classify", opt={"scope": "predict"}, tags=["classify"], status_code=200)
async def classify(
    data: ClassifyBody,
    request: Request[Any, Any, Any],
) -> Response[dict[str, Any]]:
    """Single-label classification: {label, confidence, scores, tokens, latency_ms, cached}."""
    work = work_of(request)
    return inference_response(*await classify_one(data, work))


async def classify_one(data: ClassifyBody, work: Work) -> tuple[dict[str, Any], Outcome]:
    """The work of /v1/classify."""
    return await _one(data, work, multi=False)


async def _one(data: ClassifyBody, work: Work, *, multi: bool) -> tuple[dict[str, Any], Outcome]:
    start = time.perf_counter()
    plan = _plan(data, work)
    outcome = await _run([await _text_of(data)], plan, multi, work)
    shape = _tagged if multi else _classified
    body = {
        **shape(outcome.results[0].output, plan.threshold),
        **_stats(outcome, start),
        "cached": outcome.cached,
    }
    return body, outcome


@post("/v1/tag", opt={"scope": "predict"}, tags=["classify"], status_code=200)
async def tag(
    data: ClassifyBody,
    request: Request[Any, Any, Any],
) -> Response[dict[str, Any]]:
    """Multi-label tagging: {labels, scores, tokens, latency_ms, cached}."""
    work = work_of(request)
    return inference_response(*await tag_one(data, work))


async def tag_one(data: ClassifyBody, work: Work) -> tuple[dict[str, Any], Outcome]:
    """The work of /v1/tag."""
    return await _one(data, work, multi=True)


@post("/v1/classify/batch", opt={"scope": "predict"}, tags=["classify"], status_code=200)
async def classify_batch(
    data: BatchBody,
    request: Request[Any, Any, Any],
) -> Response[dict[str, Any]]:
    """Up to 1000 texts: {results: [{label, confidence, scores}], tokens, latency_ms}."""
    work = work_of(request)
    return inference_response(*await classify_many(data, work))


async def classify_many(data: BatchBody, work: Work) -> tuple[dict[str, Any], Outcome]:
    """The work of /v1/classify/batch."""
    return await _many(data, work, multi=False)


async def _many(data: BatchBody, work: Work, *, multi: bool) -> tuple[dict[str, Any], Outcome]:
    start = time.perf_counter()
    texts, _ = as_batch(data.texts, "texts", work.settings.server.max_batch_items)
    plan = _plan(data, work)
    outcome = await _run(texts, plan, multi, work)
    shape = _tagged if multi else _classified
    results = [shape(r.output, plan.threshold) for r in outcome.results]
    return {"results": results, **_stats(outcome, start)}, outcome


@post("/v1/tag/batch", opt={"scope": "predict"}, tags=["classify"], status_code=200)
async def tag_batch(
    data: BatchBody,
    request: Request[Any, Any, Any],
) -> Response[dict[str, Any]]:
    """Up to 1000 texts: {results: [{labels, scores}], tokens, latency_ms}."""
    work = work_of(request)
    return inference_response(*await tag_many(data, work))


async def tag_many(data: BatchBody, work: Work) -> tuple[dict[str, Any], Outcome]:
    """The work of /v1/tag/batch."""
    return await _many(data, work, multi=True)


@get("/v1/classifiers", opt={"scope": "predict"}, tags=["classify"])
async def list_classifiers(
    request: Request[Any, Any, Any], classifiers: ClassifierStore
) -> dict[str, Any]:
    """Saved classifiers this key may use: its own and the shared ones."""
    items = classifiers.list(current_key(request))
    return {"data": [msgspec.to_builtins(c) for c in items]}


@post("/v1/classifiers", opt={"scope": "predict"}, tags=["classify"], status_code=201)
async def create_classifier(
    request: Request[Any, Any, Any],
    data: ClassifierBody,
    classifiers: ClassifierStore,
    registry: Registry,
) -> dict[str, Any]:
    """Save a label set with its model, description, multi-label flag and threshold. The
    model must exist and be able to score labels. 409 if the name exists (unless replace)."""
    entry = registry.resolve(data.model, "classify")
    task = entry.manifest.task if entry.manifest else None
    if task not in LABELS:
        raise ValidationFailed(
            f"Model '{entry.slug}' ({task}) cannot classify; use an embedding, zero-shot or "
            "text-classification model.",
            details={"field": "model"},
        )
    if task == "text-classification":
        own = entry.manifest.labels or []  # type: ignore[union-attr]
        if unknown := [label for label in data.labels if label not in own]:
            raise ValidationFailed(
                f"Model '{entry.slug}' only knows the labels {own}; unknown: {unknown}.",
                details={"field": "labels"},
            )
    fields = msgspec.structs.asdict(data)
    replace = fields.pop("replace")
    saved = await asyncio.to_thread(
        classifiers.create, Classifier(**fields), replace=replace, who=current_key(request)
    )
    return msgspec.to_builtins(saved)  # type: ignore[no-any-return]


@get("/v1/classifiers/{name:str}", opt={"scope": "predict"}, tags=["classify"])
async def get_classifier(
    request: Request[Any, Any, Any], name: str, classifiers: ClassifierStore
) -> dict[str, Any]:
    """One saved classifier (404 if it is another key's)."""
    return msgspec.to_builtins(classifiers.get(name, current_key(request)))  # type: ignore[no-any-return]


@delete("/v1/classifiers/{name:str}", opt={"scope": "predict"}, tags=["classify"], status_code=200)
async def delete_classifier(
    request: Request[Any, Any, Any], name: str, classifiers: ClassifierStore
) -> dict[str, Any]:
    """Delete a saved classifier: the owner's or, for shared ones, an admin's."""
    await asyncio.to_thread(classifiers.delete, name, current_key(request))
    return {"name": name, "deleted": True}


ENDPOINTS: dict[str, Endpoint] = {
    "/v1/classify": Endpoint(ClassifyBody, classify_one),
    "/v1/tag": Endpoint(ClassifyBody, tag_one),
    "/v1/classify/batch": Endpoint(BatchBody, classify_many),
    "/v1/tag/batch": Endpoint(BatchBody, tag_many),
}
"""Each path of this module to its body type and work (batch jobs run them per line)."""

ROUTES = [
    classify,
    tag,
    classify_batch,
    tag_batch,
    list_classifiers,
    create_classifier,
    get_classifier,
    delete_classifier,
]
