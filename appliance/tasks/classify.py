"""Fine-tuned text classification: softmax (single-label) or sigmoid (multi-label) over the
model's own labels (id2label). A request may name a subset of those labels: scores are then
given for that subset (renormalised for single-label models)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from appliance.errors import ValidationFailed
from appliance.runtime.tokenizer import Encoded
from appliance.tasks.base import ItemResult, TextEncoderRunner
from appliance.tasks.labels import LabelsInput, label_output, parse_labels_input, sigmoid, softmax


@dataclass(frozen=True, slots=True)
class RawScoresInput(LabelsInput):
    """An input asking for the logits instead of their softmax/sigmoid (TEI's raw_scores);
    its own type so that its cache key differs from the plain input's."""

    raw_scores: bool = True


@dataclass(frozen=True, slots=True)
class ClassifyItem:
    encoded: Encoded
    labels: tuple[str, ...] | None
    raw_scores: bool = False


class ClassificationRunner(TextEncoderRunner[np.ndarray]):  # type: ignore[type-var]
    task = "text-classification"

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels or []

    def parse_input(self, payload: Any) -> LabelsInput:  # type: ignore[override]
        parsed = parse_labels_input(payload)
        if parsed.labels:
            unknown = [label for label in parsed.labels if label not in self.labels]
            if unknown:
                raise ValidationFailed(
                    f"This model classifies into its own labels {self.labels}; unknown: {unknown}. "
                    "Use a zero-shot model for arbitrary labels.",
                    details={"field": "labels", "model_labels": self.labels},
                )
        raw = payload.get("raw_scores", False)
        if not isinstance(raw, bool):
            raise ValidationFailed(
                "`raw_scores` must be true or false.", details={"field": "raw_scores"}
            )
        if raw:
            return RawScoresInput(parsed.text, parsed.labels, parsed.multi_label)
        return parsed

    def preprocess(self, inputs: list[LabelsInput], *, truncate: bool = True) -> list[ClassifyItem]:  # type: ignore[override]
        encoded = super().preprocess([i.text for i in inputs], truncate=truncate)
        return [
            ClassifyItem(e, i.labels, isinstance(i, RawScoresInput))
            for e, i in zip(encoded, inputs, strict=True)
        ]

    def cost(self, item: ClassifyItem) -> int:  # type: ignore[override]
        return item.encoded.n_tokens

    def infer(self, batch: list[ClassifyItem]) -> list[np.ndarray]:  # type: ignore[override]
        outputs, _ = self.run_session([item.encoded for item in batch])
        return list(outputs[0].astype(np.float64))

    def postprocess(self, item: ClassifyItem, raw: np.ndarray) -> ItemResult:  # type: ignore[override]
        names = self.labels or [f"LABEL_{i}" for i in range(len(raw))]
        logits = raw
        if item.labels:
            index = [names.index(label) for label in item.labels]
            names, logits = list(item.labels), raw[index]
        if item.raw_scores:
            scores = logits
        else:
            scores = sigmoid(logits) if self.manifest.multi_label else softmax(logits)
        return ItemResult(
            label_output(names, scores),
            tokens=item.encoded.n_tokens,
            truncated=item.encoded.truncated,
        )
