"""Task API endpoints for vision models (seeds/task-api.txt), at /v1/<name> and the seed's root
paths: image-vectorisation (CLIP) and image-classification (zero-shot with CLIP, or a
fine-tuned image classifier's own labels). One image or a list, answered in the same shape."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, post

from appliance.api.responses import inference_response
from appliance.api.schemas import Texts
from appliance.api.tasks import Endpoint, Work, as_batch, work_of
from appliance.errors import ValidationFailed
from appliance.inference import Outcome

# Which model tasks each endpoint can use.
CLIP = "zero-shot-image-classification"
IMAGE_LABELS = {CLIP, "image-classification"}


class ImageVectorisationBody(msgspec.Struct, kw_only=True):
    image: str | Texts
    """A base64 JPEG, PNG or WebP (a data:image/...;base64, prefix is accepted), or a list of
    them (batch: the answer is a list in the same order)."""
    model: str = "clip"
    """A CLIP model slug or an alias from config."""


class ImageClassificationBody(msgspec.Struct, kw_only=True):
    image: str | Texts
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
) -> Response[ImageVectorResponse]:
    """Vectorise an image or a list of images (CLIP: the same space as its text vectors)."""
    work = work_of(request)
    return inference_response(*await vectorise_images(data, work))


async def vectorise_images(
    data: ImageVectorisationBody, work: Work
) -> tuple[ImageVectorResponse, Outcome]:
    """The work of /v1/image-vectorisation (batch jobs run it per line too)."""
    images, batch = as_batch(data.image, "image", work.settings.server.max_batch_items)
    outcome = await work.inference.run(
        data.model,
        [{"image": i} for i in images],
        call=work.call,
        tasks={CLIP},
        endpoint="image-vectorisation",
        priority=work.priority,
    )
    vectors = [r.output["vector"] for r in outcome.results]
    return ImageVectorResponse(vector=vectors if batch else vectors[0]), outcome


@post(
    ["/v1/image-classification", "/image-classification"],
    opt={"scope": "predict"},
    tags=["tasks"],
    status_code=200,
)
async def image_classification(
    data: ImageClassificationBody,
    request: Request[Any, Any, Any],
) -> Response[ImageClassificationResult | list[ImageClassificationResult]]:
    """Classify an image or a list of images: zero-shot over `labels` with a CLIP model, or
    with an image classifier over its own labels (or the subset `labels` names)."""
    work = work_of(request)
    return inference_response(*await classify_images(data, work))


async def classify_images(
    data: ImageClassificationBody, work: Work
) -> tuple[ImageClassificationResult | list[ImageClassificationResult], Outcome]:
    """The work of /v1/image-classification (batch jobs run it per line too)."""
    images, batch = as_batch(data.image, "image", work.settings.server.max_batch_items)
    if data.labels is None:
        # Without labels a CLIP model would answer with vectors: say what is missing instead.
        entry = work.inference.model_for(
            data.model, work.call.key, IMAGE_LABELS, "image-classification"
        )
        if entry.manifest is not None and entry.manifest.task == CLIP:
            raise ValidationFailed(
                "`labels` is required: a CLIP model classifies into the labels you give.",
                details={"field": "labels"},
            )
    payloads = [
        {"image": i} if data.labels is None else {"image": i, "labels": data.labels} for i in images
    ]
    outcome = await work.inference.run(
        data.model,
        payloads,
        call=work.call,
        tasks=IMAGE_LABELS,
        endpoint="image-classification",
        priority=work.priority,
    )
    results = [
        ImageClassificationResult(probabilities=r.output["probabilities"]) for r in outcome.results
    ]
    return (results if batch else results[0]), outcome


ROUTES: list[Any] = [image_vectorisation, image_classification]
_VECTORS = Endpoint(ImageVectorisationBody, vectorise_images)
_CLASSES = Endpoint(ImageClassificationBody, classify_images)
ENDPOINTS: dict[str, Endpoint] = {
    "/v1/image-vectorisation": _VECTORS,
    "/image-vectorisation": _VECTORS,
    "/v1/image-classification": _CLASSES,
    "/image-classification": _CLASSES,
}
