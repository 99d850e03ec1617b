"""Classification over labels the request gives: input parsing and score calibration shared
by the runners that can do it (embeddings by similarity, NLI by entailment, fine-tuned
classifiers restricted to a subset of their own labels)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from appliance.errors import ValidationFailed
from appliance.tasks.base import require_text

MAX_LABELS = 100


@dataclass(frozen=True, slots=True)
class LabelsInput:
    text: str
    labels: tuple[str, ...] | None
    multi_label: bool = False


def parse_labels_input(payload: Any) -> LabelsInput:
    text = require_text(payload)
    labels = payload.get("labels")
    multi = payload.get("multi_label", False)
    if not isinstance(multi, bool):
        raise ValidationFailed(
            "`multi_label` must be true or false.", details={"field": "multi_label"}
        )
    if labels is None:
        return LabelsInput(text, None, multi)
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
    return LabelsInput(text, tuple(labels), multi)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.exp(x - x.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def label_output(labels: tuple[str, ...] | list[str], scores: np.ndarray) -> dict[str, Any]:
    """{label, score, probabilities} with the best label first in nothing but `label`."""
    top = int(np.argmax(scores))
    return {
        "label": labels[top],
        "score": float(scores[top]),
        "probabilities": {label: float(p) for label, p in zip(labels, scores, strict=True)},
    }
