"""Reranking with a cross-encoder (a sequence classifier with one logit, ms-marco / bge-reranker
style): each (query, document) pair is one model input; its logit is the relevance. The routes
sort, take the sigmoid or the raw logit, and shape the answer (TEI or Cohere)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from appliance.errors import InputTooLong, ValidationFailed
from appliance.runtime.tokenizer import Encoded
from appliance.tasks.base import ItemResult, TextEncoderRunner


@dataclass(frozen=True, slots=True)
class RerankInput:
    query: str
    texts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RerankItem:
    query: RerankInput
    pairs: list[Encoded]

    @property
    def truncated(self) -> bool:
        return any(p.truncated for p in self.pairs)


class RerankRunner(TextEncoderRunner[np.ndarray]):  # type: ignore[type-var]
    task = "text-ranking"

    def parse_input(self, payload: Any) -> RerankInput:  # type: ignore[override]
        if not isinstance(payload, dict):
            raise ValidationFailed("Send an object with `query` and `texts`.")
        query, texts = payload.get("query"), payload.get("texts")
        if not isinstance(query, str) or not query:
            raise ValidationFailed(
                "`query` must be a non-empty string.", details={"field": "query"}
            )
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValidationFailed(
                "`texts` must be a non-empty list of strings.", details={"field": "texts"}
            )
        return RerankInput(query, tuple(texts))

    def preprocess(self, inputs: list[RerankInput], *, truncate: bool = True) -> list[RerankItem]:  # type: ignore[override]
        items = [
            RerankItem(q, self.tokenizer.encode([q.query] * len(q.texts), list(q.texts)))
            for q in inputs
        ]
        if not truncate:
            too_long = [i for item in items for i, p in enumerate(item.pairs) if p.truncated]
            if too_long:
                raise InputTooLong(
                    f"A (query, text) pair is longer than the model's {self.manifest.max_tokens} "
                    "tokens and truncation was turned off.",
                    details={"max_tokens": self.manifest.max_tokens, "texts": too_long},
                )
        return items

    def cost(self, item: RerankItem) -> int:  # type: ignore[override]
        """Every (query, text) pair runs through the model: each is charged."""
        return sum(p.n_tokens for p in item.pairs)

    def infer(self, batch: list[RerankItem]) -> list[np.ndarray]:  # type: ignore[override]
        outputs, _ = self.run_session([p for item in batch for p in item.pairs])
        logits = outputs[0].astype(np.float64)[:, 0]
        out, start = [], 0
        for item in batch:
            out.append(logits[start : start + len(item.pairs)])
            start += len(item.pairs)
        return out

    def postprocess(self, item: RerankItem, raw: np.ndarray) -> ItemResult:  # type: ignore[override]
        return ItemResult(
            {"logits": [float(x) for x in raw], "truncated": [p.truncated for p in item.pairs]},
            tokens=self.cost(item),
            truncated=item.truncated,
        )

    def warmup(self) -> None:
        self.infer(self.preprocess([RerankInput("warm up", ("a", "b"))]))
