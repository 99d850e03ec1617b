"""Sentence embeddings: pooled (mean / cls / max, as the checkpoint says) and L2-normalised.

With `labels` in the input, an embedding model also classifies, zero-shot, by similarity
between the text and each label: a softmax over cosine / temperature (single-label), or a
sigmoid of (cosine - bias) / temperature per label (multi-label). Temperature and bias are
manifest settings (zero_shot_temperature, zero_shot_bias) so a model can be calibrated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from appliance.errors import ValidationFailed
from appliance.runtime.tokenizer import Encoded
from appliance.tasks.base import ItemResult, TextEncoderRunner, require_text
from appliance.tasks.labels import LabelsInput, label_output, parse_labels_input, sigmoid, softmax

DEFAULT_TEMPERATURE = 0.05
DEFAULT_BIAS = 0.3


def pool(hidden: np.ndarray, mask: np.ndarray, how: str) -> np.ndarray:
    if how == "cls":
        return hidden[:, 0]
    m = mask[..., None].astype(hidden.dtype)
    if how == "max":
        return np.where(m > 0, hidden, -np.inf).max(axis=1)
    return (hidden * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12, None)


@dataclass(frozen=True, slots=True)
class Unnormalised:
    """A text whose vector is wanted as pooled, without the L2 normalisation the manifest may
    ask for (TEI's `normalize: false`); its own type so that it is cached apart."""

    text: str


@dataclass(frozen=True, slots=True)
class EmbedItem:
    """The text's encoding, then one per label (zero-shot)."""

    encodings: list[Encoded]
    query: LabelsInput | None
    normalise: bool = True

    @property
    def truncated(self) -> bool:
        return self.encodings[0].truncated


class EmbeddingRunner(TextEncoderRunner[Any]):  # type: ignore[type-var]
    task = "feature-extraction"

    def parse_input(self, payload: Any) -> str | LabelsInput | Unnormalised:  # type: ignore[override]
        if isinstance(payload, dict) and "normalize" in payload:
            if not isinstance(payload["normalize"], bool):
                raise ValidationFailed(
                    "`normalize` must be true or false.", details={"field": "normalize"}
                )
            if not payload["normalize"] and "labels" not in payload:
                return Unnormalised(require_text(payload))
        if isinstance(payload, dict) and "labels" in payload:
            parsed = parse_labels_input(payload)
            if parsed.labels is None:
                raise ValidationFailed(
                    "`labels` is required: an embedding model classifies into the labels you give.",
                    details={"field": "labels"},
                )
            return parsed
        return require_text(payload)

    def preprocess(self, inputs: list[Any], *, truncate: bool = True) -> list[EmbedItem]:  # type: ignore[override]
        texts = [i.text if isinstance(i, (LabelsInput, Unnormalised)) else i for i in inputs]
        encoded = super().preprocess(texts, truncate=truncate)
        items = []
        for inp, enc in zip(inputs, encoded, strict=True):
            if isinstance(inp, LabelsInput) and inp.labels:
                items.append(EmbedItem([enc, *self.tokenizer.encode(list(inp.labels))], inp))
            else:
                items.append(EmbedItem([enc], None, not isinstance(inp, Unnormalised)))
        return items

    def cost(self, item: EmbedItem) -> int:  # type: ignore[override]
        return sum(e.n_tokens for e in item.encodings)

    def embed(self, encodings: list[Encoded], rows: np.ndarray | None = None) -> np.ndarray:
        """Pooled vectors, L2-normalised if the manifest says so (only `rows`, if given)."""
        outputs, mask = self.run_session(encodings)
        vectors = pool(outputs[0], mask, self.manifest.pooling or "mean")
        if not self.manifest.normalize:
            return vectors
        if rows is None:
            return l2_normalise(vectors)
        vectors[rows] = l2_normalise(vectors[rows])  # row-wise: the same values as all at once
        return vectors

    def infer(self, batch: list[EmbedItem]) -> list[np.ndarray]:  # type: ignore[override]
        flat = [e for item in batch for e in item.encodings]
        rows = None
        if not all(item.normalise for item in batch):
            rows = np.array([item.normalise for item in batch for _ in item.encodings])
        vectors = self.embed(flat, rows).astype(np.float32)
        out, start = [], 0
        for item in batch:
            out.append(vectors[start : start + len(item.encodings)])
            start += len(item.encodings)
        return out

    def postprocess(self, item: EmbedItem, raw: np.ndarray) -> ItemResult:  # type: ignore[override]
        tokens = self.cost(item)
        if item.query is None or not item.query.labels:
            return ItemResult({"vector": raw[0].tolist()}, tokens=tokens, truncated=item.truncated)
        unit = l2_normalise(raw.astype(np.float64))
        cosine = unit[1:] @ unit[0]
        cfg = self.manifest.config
        temperature = float(cfg.get("zero_shot_temperature", DEFAULT_TEMPERATURE))
        if item.query.multi_label:
            scores = sigmoid(
                (cosine - float(cfg.get("zero_shot_bias", DEFAULT_BIAS))) / temperature
            )
        else:
            scores = softmax(cosine / temperature)
        return ItemResult(
            label_output(item.query.labels, scores), tokens=tokens, truncated=item.truncated
        )
