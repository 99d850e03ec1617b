"""Task API endpoints for vision models (seeds/task-api.txt), at /v1/<name> and the seed's root
paths: image-vectorisation (CLIP) and image-classification (zero-shot with CLIP, or a
fine-tuned image classifier's own labels). One image or a list, answered in the same shape."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, post

from appliance.api.responses import call_for, inference_response
from appliance.api.tasks import as_batch
from appliance.config import Settings
from appliance.errors import ValidationFailed
from appliance.inference import Inference

# Which model tasks each endpoint can use.
CLIP = "zero-shot-image-classification"
IMAGE_LABELS = {CLIP, "image-classification"}


class ImageVectorisationBody(msgspec.Struct, kw_only=True):
    image: str | list[str]
    """A base64 JPEG, PNG or WebP (a data:image/...;base64, prefix is accepted), or a list of
    them (batch: the answer is a list in the same order)."""
    model: str = "clip"
    """A CLIP model slug or an alias from config."""


class ImageClassificationBody(msgspec.Struct, kw_only=True):
    image: str | list[str]
    """A base64 JPEG, PNG or WebP, or a list of them (batch)."""
    labels: list[str] | None = None
    """The labels to choose from (required for a CLIP model; for an image classifier a subset
    of its own labels, or none for all of them)."""
    model: str = "clip"


class ImageVectorResponse(msgspec.Struct):
    vector: list[Any]
    """One vector, or (for a list of images) a list of vectors in the same order."""


class ImageClassificationResult(msgspec.Struct):
    probabilities: dict[str, float]
    """Label -> probability."""


@post(
    ["/v1/image-vectorisation", "/image-vectorisation"],
    opt={"scope": "predict"},
    tags=["tasks"],
    status_code=200,
)
async def image_vectorisation(
    data: ImageVectorisationBody,
    request: Request[Any, Any, Any],
    inference: Inference,
    settings: Settings,
) -> Response[ImageVectorResponse]:
    """Vectorise an image or a list of images (CLIP: the same space as its text vectors)."""
    images, batch = as_batch(data.image, "image", settings.server.max_batch_items)
    outcome = await inference.run(
        data.model,
        [{"image": i} for i in images],
        call=call_for(request),
        tasks={CLIP},
        endpoint="image-vectorisation",
    )
    vectors = [r.output["vector"] for r in outcome.results]
    return inference_response(ImageVectorResponse(vector=vectors if batch else vectors[0]), outcome)


@post(
    ["/v1/image-classification", "/image-classification"],
    opt={"scope": "predict"},
    tags=["tasks"],
    status_code=200,
)
async def image_classification(
    data: ImageClassificationBody,
    request: Request[Any, Any, Any],
    inference: Inference,
    settings: Settings,
) -> Response[ImageClassificationResult | list[ImageClassificationResult]]:
    """Classify an image or a list of images: zero-shot over `labels` with a CLIP model, or
    with an image classifier over its own labels (or the subset `labels` names)."""
    images, batch = as_batch(data.image, "image", settings.server.max_batch_items)
    call = call_for(request)
    if data.labels is None:
        # Without labels a CLIP model would answer with vectors: say what is missing instead.
        entry = inference.model_for(data.model, call.key, IMAGE_LABELS, "image-classification")
        if entry.manifest is not None and entry.manifest.task == CLIP:
            raise ValidationFailed(
                "`labels` is required: a CLIP model classifies into the labels you give.",
                details={"field": "labels"},
            )
    payloads = [
        {"image": i} if data.labels is None else {"image": i, "labels": data.labels} for i in images
    ]
    outcome = await inference.run(
        data.model, payloads, call=call, tasks=IMAGE_LABELS, endpoint="image-classification"
    )
    results = [
        ImageClassificationResult(probabilities=r.output["probabilities"]) for r in outcome.results
    ]
    return inference_response(results if batch else results[0], outcome)


ROUTES: list[Any] = [image_vectorisation, image_classification]
