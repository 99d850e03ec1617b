"""Fine-tuned text classification: softmax (single-label) or sigmoid (multi-label) over id2label."""

from __future__ import annotations

import numpy as np

from appliance.runtime.tokenizer import Encoded
from appliance.tasks.base import ItemResult, TextEncoderRunner


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class ClassificationRunner(TextEncoderRunner[np.ndarray]):
    task = "text-classification"

    def infer(self, batch: list[Encoded]) -> list[np.ndarray]:
        outputs, _ = self.run_session(batch)
        logits = outputs[0].astype(np.float64)
        probs = sigmoid(logits) if self.manifest.multi_label else softmax(logits)
        return list(probs)

    def postprocess(self, item: Encoded, raw: np.ndarray) -> ItemResult:
        labels = self.manifest.labels or [f"LABEL_{i}" for i in range(len(raw))]
        top = int(np.argmax(raw))
        output = {
            "label": labels[top],
            "score": float(raw[top]),
            "probabilities": {label: float(p) for label, p in zip(labels, raw, strict=True)},
        }
        return ItemResult(output, tokens=item.n_tokens, truncated=item.truncated)
