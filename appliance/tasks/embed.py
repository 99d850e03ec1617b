"""Sentence embeddings: pooled (mean / cls / max, as the checkpoint says) and L2-normalised."""

from __future__ import annotations

import numpy as np

from appliance.runtime.tokenizer import Encoded
from appliance.tasks.base import ItemResult, TextEncoderRunner


def pool(hidden: np.ndarray, mask: np.ndarray, how: str) -> np.ndarray:
    if how == "cls":
        return hidden[:, 0]
    m = mask[..., None].astype(hidden.dtype)
    if how == "max":
        return np.where(m > 0, hidden, -np.inf).max(axis=1)
    return (hidden * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12, None)


class EmbeddingRunner(TextEncoderRunner[np.ndarray]):
    task = "feature-extraction"

    def infer(self, batch: list[Encoded]) -> list[np.ndarray]:
        outputs, mask = self.run_session(batch)
        vectors = pool(outputs[0], mask, self.manifest.pooling or "mean")
        if self.manifest.normalize:
            vectors = l2_normalise(vectors)
        return list(vectors.astype(np.float32))

    def postprocess(self, item: Encoded, raw: np.ndarray) -> ItemResult:
        return ItemResult({"vector": raw.tolist()}, tokens=item.n_tokens, truncated=item.truncated)
