"""The task API (seeds/task-api.txt), at /v1/<name> and at the seed's root paths.

Each endpoint takes one item or a list (batch) and answers in the same shape, in order.
Handlers only reshape requests and answers; the work is in appliance.inference and the runners.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, post

from appliance.api.responses import call_for, inference_response
from appliance.config import Settings
from appliance.errors import ValidationFailed
from appliance.inference import Inference

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
    text: str | list[str]
    """A text, or a list of texts (batch: the answer is a list in the same order)."""
    model: str = "english"
    """A model slug or an alias from config (english, multilingual, clip, ...)."""
    truncate: bool = True
    """Cut texts longer than the model's max tokens (X-Truncated says so); false: 422."""


class VectorResponse(msgspec.Struct):
    vector: list[Any]
    """One vector, or (for a list of texts) a list of vectors in the same order."""


class TextClassificationBody(msgspec.Struct, kw_only=True):
    text: str | list[str]
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
    text: str | list[str]
    model: str = "english"
    threshold: float = 0.5
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
    inference: Inference,
    settings: Settings,
) -> Response[VectorResponse]:
    """Vectorise a text or a list of texts (CLIP models: vectors in the image space)."""
    texts, batch = as_batch(data.text, "text", settings.server.max_batch_items)
    outcome = await inference.run(
        data.model,
        [{"text": t} for t in texts],
        call=call_for(request),
        tasks=VECTORISE,
        truncate=data.truncate,
        endpoint="text-vectorisation",
    )
    vectors = [r.output["vector"] for r in outcome.results]
    return inference_response(VectorResponse(vector=one_or_list(vectors, batch)), outcome)


@post(
    ["/v1/text-classification", "/text-classification"],
    opt={"scope": "predict"},
    tags=["tasks"],
    status_code=200,
)
async def text_classification(
    data: TextClassificationBody,
    request: Request[Any, Any, Any],
    inference: Inference,
    settings: Settings,
) -> Response[ProbabilitiesResponse]:
    """Probabilities of the given labels for a text (zero-shot), or for each text of a list."""
    texts, batch = as_batch(data.text, "text", settings.server.max_batch_items)
    labels = per_item(data.labels, "labels", len(texts), batch)
    payloads = [
        {"text": t, "labels": ls, "multi_label": data.multi_label}
        for t, ls in zip(texts, labels, strict=True)
    ]
    outcome = await inference.run(
        data.model, payloads, call=call_for(request), tasks=LABELS, endpoint="text-classification"
    )
    probabilities = [r.output["probabilities"] for r in outcome.results]
    return inference_response(ProbabilitiesResponse(one_or_list(probabilities, batch)), outcome)


@post(["/v1/qa", "/qa"], opt={"scope": "predict"}, tags=["tasks"], status_code=200)
async def question_answering(
    data: QABody, request: Request[Any, Any, Any], inference: Inference, settings: Settings
) -> Response[QAResponse]:
    """Extractive answer to a question from a context; "unknown" when it holds none."""
    questions, batch = as_batch(data.question, "question", settings.server.max_batch_items)
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
    outcome = await inference.run(
        data.model, payloads, call=call_for(request), tasks=QA, endpoint="qa"
    )
    answers = [r.output["answer"] for r in outcome.results]
    return inference_response(QAResponse(one_or_list(answers, batch)), outcome)


@post(["/v1/emotion", "/emotion"], opt={"scope": "predict"}, tags=["tasks"], status_code=200)
async def emotion(
    data: EmotionBody, request: Request[Any, Any, Any], inference: Inference, settings: Settings
) -> Response[EmotionResponse]:
    """Emotions in a text: GoEmotions' labels above the threshold, comma-separated. A model
    fine-tuned on those labels scores them itself; other models score them zero-shot."""
    if not 0 <= data.threshold <= 1:
        raise ValidationFailed(
            "`threshold` must be between 0 and 1.", details={"field": "threshold"}
        )
    texts, batch = as_batch(data.text, "text", settings.server.max_batch_items)
    entry = inference.model_for(data.model, call_for(request).key, LABELS, "emotion")
    fine_tuned = entry.manifest is not None and entry.manifest.task == "text-classification"
    labels = None if fine_tuned else list(GO_EMOTIONS)
    payloads = [{"text": t, "labels": labels, "multi_label": True} for t in texts]
    outcome = await inference.run(
        data.model, payloads, call=request.state.call, tasks=LABELS, endpoint="emotion"
    )
    outputs = [above(r.output["probabilities"], data.threshold) for r in outcome.results]
    return inference_response(EmotionResponse(one_or_list(outputs, batch)), outcome)


def above(probabilities: dict[str, float], threshold: float) -> str:
    """Labels scoring at least `threshold`, best first; the best one alone when none does."""
    ranked = sorted(probabilities.items(), key=lambda kv: kv[1], reverse=True)
    chosen = [label for label, p in ranked if p >= threshold] or [ranked[0][0]]
    return ",".join(chosen)


ROUTES = [text_vectorisation, text_classification, question_answering, emotion]
