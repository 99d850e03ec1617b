"""The task API (seeds/task-api.txt), at /v1/<name> and at the seed's root paths.

Each endpoint takes one item or a list (batch) and answers in the same shape, in order.
Each endpoint's work is a plain async function of its body and a `Work` (who calls, the shared
services, the priority), so that the litestar handler and a batch job's worker run the very
same code; the handlers only add HTTP (the Call from the request, headers). `ENDPOINTS` maps
each path to its body type and that function.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec
from litestar import Request, Response, post

from appliance.api.responses import call_for, inference_response
from appliance.api.schemas import Fraction, Texts
from appliance.classifiers import ClassifierStore
from appliance.config import Settings
from appliance.errors import ValidationFailed
from appliance.inference import Call, Inference, Outcome
from appliance.runtime.batcher import REALTIME

# Which model tasks each endpoint can use.
VECTORISE = {"feature-extraction", "zero-shot-image-classification"}
LABELS = {"feature-extraction", "zero-shot-classification", "text-classification"}
QA = {"question-answering"}

# The 28 labels seeds/task-api.txt lists for /emotion (GoEmotions).
GO_EMOTIONS = (
    "neutral", "admiration", "approval", "annoyance", "gratitude", "disapproval", "amusement",
    "curiosity", "love", "optimism", "disappointment", "joy", "realization", "anger", "sadness",
    "confusion", "caring", "excitement", "surprise", "disgust", "desire", "fear", "remorse",
    "embarrassment", "nervousness", "pride", "relief", "grief",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Work:
    """What an endpoint's work needs besides its body: the caller's Call, the shared services,
    and the micro-batcher priority of its model calls (batch jobs run at BACKGROUND)."""

    call: Call
    inference: Inference
    settings: Settings
    classifiers: ClassifierStore | None = None
    priority: int = REALTIME


@dataclass(frozen=True, slots=True)
class Services:
    """What every inference handler's Work shares, kept in the app's state by create_app."""

    inference: Inference
    settings: Settings
    classifiers: ClassifierStore | None = None


def work_of(request: Request[Any, Any, Any]) -> Work:
    """The request's Work: its Call and the app's shared services.

    Read from the request rather than injected: resolving even one litestar dependency per
    request (its signature model, the cleanup group) cost a seventh of a cached answer
    (measured in-process, 133-146 vs 111-126 us)."""
    services: Services = request.app.state.services
    return Work(call_for(request), services.inference, services.settings, services.classifiers)


class Endpoint(NamedTuple):
    """An endpoint's request body type and the function doing its work: (answer, outcome);
    outcome None for work that runs no model (a document's text, a pipeline of steps)."""

    body: type[Any]
    run: Callable[[Any, Work], Awaitable[tuple[Any, Outcome | None]]]


def as_batch(value: Any, field: str, limit: int) -> tuple[list[Any], bool]:
    """(items, was_batch). A list must hold 1..limit items."""
    if not isinstance(value, list):
        return [value], False
    if not value:
        raise ValidationFailed(f"`{field}` must not be an empty list.", details={"field": field})
    if len(value) > limit:
        raise ValidationFailed(
            f"`{field}` has {len(value)} items; at most {limit} per request.",
            details={"field": field, "max_items": limit},
        )
    return value, True


def per_item(value: Any, field: str, count: int, batch: bool) -> list[Any]:
    """A field given once for all items, or (batch) a list with one entry per item."""
    if batch and isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        if len(value) != count:
            raise ValidationFailed(
                f"`{field}` has {len(value)} entries for {count} items.", details={"field": field}
            )
        return list(value)
    return [value] * count


def one_or_list(values: list[Any], batch: bool) -> Any:
    return values if batch else values[0]


class TextVectorisationBody(msgspec.Struct, kw_only=True):
    text: str | Texts
    """A text, or a list of texts (batch: the answer is a list in the same order)."""
    model: str = "english"
    """A model slug or an alias from config (english, multilingual, clip, ...)."""
    truncate: bool = True
    """Cut texts longer than the model's max tokens (X-Truncated says so); false: 422."""


class VectorResponse(msgspec.Struct):
    vector: list[Any]
    """One vector, or (for a list of texts) a list of vectors in the same order."""


class TextClassificationBody(msgspec.Struct, kw_only=True):
    text: str | Texts
    labels: list[Any]
    """Labels to score; for a batch, one list for all texts or one list per text."""
    model: str = "english"
    multi_label: bool = False
    """Score each label independently instead of one distribution over the labels."""


class ProbabilitiesResponse(msgspec.Struct):
    probabilities: dict[str, float] | list[dict[str, float]]


class QABody(msgspec.Struct, kw_only=True):
    question: str | list[str]
    context: str | list[str]
    prev_q: list[Any] = msgspec.field(default_factory=list)
    """Earlier questions of the conversation (a list per item for a batch)."""
    prev_a: list[Any] = msgspec.field(default_factory=list)
    """Answers to prev_q, in order."""
    model: str = "english"


class QAResponse(msgspec.Struct):
    answer: str | list[str]
    """The answer span, or "unknown" when the context holds no answer."""


class EmotionBody(msgspec.Struct, kw_only=True):
    text: str | Texts
    model: str = "english"
    threshold: Fraction = 0.5
    """Emotions scoring at least this are returned (the top one when none does)."""


class EmotionResponse(msgspec.Struct):
    output: str | list[str]
    """Comma-separated emotions (GoEmotions' 28 labels)."""


@post(
    ["/v1/text-vectorisation", "/text-vectorisation"],
    opt={"scope": "predict"},
    tags=["tasks"],
    status_code=200,
)
async def text_vectorisation(
    data: TextVectorisationBody,
    request: Request[Any, Any, Any],
) -> Response[VectorResponse]:
    """Vectorise a text or a list of texts (CLIP models: vectors in the image space)."""
    work = work_of(request)
    return inference_response(*await vectorise(data, work))


async def vectorise(data: TextVectorisationBody, work: Work) -> tuple[VectorResponse, Outcome]:
    """The work of /v1/text-vectorisation."""
    texts, batch = as_batch(data.text, "text", work.settings.server.max_batch_items)
    outcome = await work.inference.run(
        data.model,
        [{"text": t} for t in texts],
        call=work.call,
        tasks=VECTORISE,
        truncate=data.truncate,
        endpoint="text-vectorisation",
        priority=work.priority,
    )
    vectors = [r.output["vector"] for r in outcome.results]
    return VectorResponse(vector=one_or_list(vectors, batch)), outcome


@post(
    ["/v1/text-classification", "/text-classification"],
    opt={"scope": "predict"},
    tags=["tasks"],
    status_code=200,
)
async def text_classification(
    data: TextClassificationBody,
    request: Request[Any, Any, Any],
) -> Response[ProbabilitiesResponse]:
    """Probabilities of the given labels for a text (zero-shot), or for each text of a list."""
    work = work_of(request)
    return inference_response(*await classify_texts(data, work))


async def classify_texts(
    data: TextClassificationBody, work: Work
) -> tuple[ProbabilitiesResponse, Outcome]:
    """The work of /v1/text-classification."""
    texts, batch = as_batch(data.text, "text", work.settings.server.max_batch_items)
    labels = per_item(data.labels, "labels", len(texts), batch)
    payloads = [
        {"text": t, "labels": ls, "multi_label": data.multi_label}
        for t, ls in zip(texts, labels, strict=True)
    ]
    outcome = await work.inference.run(
        data.model,
        payloads,
        call=work.call,
        tasks=LABELS,
        endpoint="text-classification",
        priority=work.priority,
    )
    probabilities = [r.output["probabilities"] for r in outcome.results]
    return ProbabilitiesResponse(one_or_list(probabilities, batch)), outcome


@post(["/v1/qa", "/qa"], opt={"scope": "predict"}, tags=["tasks"], status_code=200)
async def question_answering(data: QABody, request: Request[Any, Any, Any]) -> Response[QAResponse]:
    """Extractive answer to a question from a context; "unknown" when it holds none."""
    work = work_of(request)
    return inference_response(*await answer(data, work))


async def answer(data: QABody, work: Work) -> tuple[QAResponse, Outcome]:
    """The work of /v1/qa."""
    questions, batch = as_batch(data.question, "question", work.settings.server.max_batch_items)
    contexts = data.context if batch else [data.context]
    if not isinstance(contexts, list) or len(contexts) != len(questions):
        raise ValidationFailed(
            "`context` needs one entry per question.", details={"field": "context"}
        )
    prev_q = per_item(data.prev_q, "prev_q", len(questions), batch)
    prev_a = per_item(data.prev_a, "prev_a", len(questions), batch)
    payloads = [
        {"question": q, "context": c, "prev_q": pq, "prev_a": pa}
        for q, c, pq, pa in zip(questions, contexts, prev_q, prev_a, strict=True)
    ]
    outcome = await work.inference.run(
        data.model, payloads, call=work.call, tasks=QA, endpoint="qa", priority=work.priority
    )
    answers = [r.output["answer"] for r in outcome.results]
    return QAResponse(one_or_list(answers, batch)), outcome


@post(["/v1/emotion", "/emotion"], opt={"scope": "predict"}, tags=["tasks"], status_code=200)
async def emotion(data: EmotionBody, request: Request[Any, Any, Any]) -> Response[EmotionResponse]:
    """Emotions in a text: GoEmotions' labels above the threshold, comma-separated. A model
    fine-tuned on those labels scores them itself; other models score them zero-shot."""
    work = work_of(request)
    return inference_response(*await emotions(data, work))


async def emotions(data: EmotionBody, work: Work) -> tuple[EmotionResponse, Outcome]:
    """The work of /v1/emotion."""
    if not 0 <= data.threshold <= 1:
        raise ValidationFailed(
            "`threshold` must be between 0 and 1.", details={"field": "threshold"}
        )
    texts, batch = as_batch(data.text, "text", work.settings.server.max_batch_items)
    entry = work.inference.model_for(data.model, work.call.key, LABELS, "emotion")
    fine_tuned = entry.manifest is not None and entry.manifest.task == "text-classification"
    labels = None if fine_tuned else list(GO_EMOTIONS)
    payloads = [{"text": t, "labels": labels, "multi_label": True} for t in texts]
    outcome = await work.inference.run(
        data.model,
        payloads,
        call=work.call,
        tasks=LABELS,
        endpoint="emotion",
        priority=work.priority,
    )
    outputs = [above(r.output["probabilities"], data.threshold) for r in outcome.results]
    return EmotionResponse(one_or_list(outputs, batch)), outcome


def above(probabilities: dict[str, float], threshold: float) -> str:
    """Labels scoring at least `threshold`, best first; the best one alone when none does."""
    ranked = sorted(probabilities.items(), key=lambda kv: kv[1], reverse=True)
    chosen = [label for label, p in ranked if p >= threshold] or [ranked[0][0]]
    return ",".join(chosen)


ROUTES = [text_vectorisation, text_classification, question_answering, emotion]

_VECTORISE = Endpoint(TextVectorisationBody, vectorise)
_CLASSIFY_TEXTS = Endpoint(TextClassificationBody, classify_texts)
_QA = Endpoint(QABody, answer)
_EMOTION = Endpoint(EmotionBody, emotions)
ENDPOINTS: dict[str, Endpoint] = {
    "/v1/text-vectorisation": _VECTORISE,
    "/text-vectorisation": _VECTORISE,
    "/v1/text-classification": _CLASSIFY_TEXTS,
    "/text-classification": _CLASSIFY_TEXTS,
    "/v1/qa": _QA,
    "/qa": _QA,
    "/v1/emotion": _EMOTION,
    "/emotion": _EMOTION,
}
"""Each path of this module to its body type and work (batch jobs run them per line)."""
