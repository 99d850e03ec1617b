"""Image classification with a fine-tuned classifier (ViT-style): softmax, or sigmoid for a
multi-label model, over the model's own labels (id2label). A request may name a subset of
them: scores are then given for that subset (renormalised for single-label models).

Also the pieces every image runner shares: reading the preprocessing from the manifest, the
`labels` field, and decoding a batch of images off the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from appliance.errors import ValidationFailed
from appliance.models.manifest import Manifest
from appliance.runtime.images import ImagePreprocessor, decode_sized, image_tokens, require_image
from appliance.tasks.base import ItemResult, Runner
from appliance.tasks.labels import MAX_LABELS, label_output, sigmoid, softmax


def parse_labels(payload: dict[str, Any]) -> tuple[str, ...] | None:
    """The optional `labels` field: 1..MAX_LABELS distinct, non-empty strings."""
    labels = payload.get("labels")
    if labels is None:
        return None
    if not isinstance(labels, list) or not labels:
        raise ValidationFailed(
            "`labels` must be a non-empty list of strings.", details={"field": "labels"}
        )
    if len(labels) > MAX_LABELS:
        raise ValidationFailed(
            f"`labels` has {len(labels)} entries; at most {MAX_LABELS}.",
            details={"field": "labels"},
        )
    if not all(isinstance(label, str) and label.strip() for label in labels):
        raise ValidationFailed("`labels` must be non-empty strings.", details={"field": "labels"})
    if len(set(labels)) != len(labels):
        raise ValidationFailed("`labels` must be distinct.", details={"field": "labels"})
    return tuple(labels)


def preprocessor_of(manifest: Manifest) -> ImagePreprocessor:
    config = manifest.config.get("preprocessing")
    if not isinstance(config, dict):
        raise ValueError("manifest.config has no image preprocessing settings")
    return ImagePreprocessor.from_config(config)


def visual_tokens_of(manifest: Manifest) -> int:
    """The fewest tokens an image is charged (API.md: images count as configured visual
    tokens; a large one more, see appliance.runtime.images.image_tokens)."""
    tokens = manifest.config.get("visual_tokens")
    if not isinstance(tokens, int) or tokens < 1:
        raise ValueError("manifest.config.visual_tokens must be a positive integer")
    return tokens


@dataclass(frozen=True, slots=True)
class ImageInput:
    image: str
    """Base64 text, as the request gave it (less a data-URL prefix): the cache keys on it."""
    labels: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class ImageItem:
    pixels: np.ndarray
    labels: tuple[str, ...] | None
    tokens: int


class ImageClassificationRunner(Runner[ImageInput, ImageItem, np.ndarray]):
    task = "image-classification"

    def __init__(self, folder: Path, manifest: Manifest, session: ort.InferenceSession) -> None:
        super().__init__(folder, manifest, session)
        self.preprocessor = preprocessor_of(manifest)
        self.visual_tokens = visual_tokens_of(manifest)
        self.labels = list(manifest.labels or [])
        if not self.labels:
            raise ValueError("an image-classification manifest needs labels")

    def parse_input(self, payload: Any) -> ImageInput:
        image = require_image(payload)
        labels = parse_labels(payload)
        if labels:
            unknown = [label for label in labels if label not in self.labels]
            if unknown:
                raise ValidationFailed(
                    f"This model classifies into its own labels {self.labels}; unknown: "
                    f"{unknown}. Use a CLIP model for arbitrary labels.",
                    details={"field": "labels", "model_labels": self.labels},
                )
        return ImageInput(image, labels)

    def preprocess(self, inputs: list[ImageInput], *, truncate: bool = True) -> list[ImageItem]:
        items = []
        for i in inputs:
            image, (width, height) = decode_sized(i.image, min_side=self.preprocessor.min_side)
            tokens = image_tokens(width, height, self.visual_tokens)
            items.append(ImageItem(self.preprocessor(image), i.labels, tokens))
        return items

    def cost(self, item: ImageItem) -> int:
        return item.tokens

    def infer(self, batch: list[ImageItem]) -> list[np.ndarray]:
        pixels = np.stack([item.pixels for item in batch])
        logits = self.session.run(None, self.feeds({"pixel_values": pixels}))[0]
        return list(logits.astype(np.float64))

    def postprocess(self, item: ImageItem, raw: np.ndarray) -> ItemResult:
        names, logits = self.labels, raw
        if item.labels:
            index = [names.index(label) for label in item.labels]
            names, logits = list(item.labels), raw[index]
        scores = sigmoid(logits) if self.manifest.multi_label else softmax(logits)
        return ItemResult(label_output(names, scores), tokens=item.tokens)
