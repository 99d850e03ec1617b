"""Zero-shot classification with an NLI model, as transformers' zero-shot pipeline does it:
each label becomes a hypothesis ("This example is {label}.") paired with the text.
Single-label: softmax over the labels' entailment logits. Multi-label: for each label,
softmax over (contradiction, entailment), the entailment share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from appliance.errors import InputTooLong, ValidationFailed
from appliance.runtime.tokenizer import Encoded
from appliance.tasks.base import ItemResult, TextEncoderRunner
from appliance.tasks.labels import LabelsInput, label_output, parse_labels_input, softmax

DEFAULT_TEMPLATE = "This example is {}."


@dataclass(frozen=True, slots=True)
class PairsItem:
    query: LabelsInput
    pairs: list[Encoded]

    @property
    def truncated(self) -> bool:
        return any(p.truncated for p in self.pairs)


class ZeroShotRunner(TextEncoderRunner[np.ndarray]):  # type: ignore[type-var]
    task = "zero-shot-classification"

    def parse_input(self, payload: Any) -> LabelsInput:  # type: ignore[override]
        parsed = parse_labels_input(payload)
        if not parsed.labels:
            raise ValidationFailed(
                "`labels` is required: a zero-shot model classifies into the labels you give.",
                details={"field": "labels"},
            )
        return parsed

    def preprocess(self, inputs: list[LabelsInput], *, truncate: bool = True) -> list[PairsItem]:  # type: ignore[override]
        template = self.manifest.config.get("hypothesis_template", DEFAULT_TEMPLATE)
        items = []
        for query in inputs:
            assert query.labels is not None
            hypotheses = [template.format(label) for label in query.labels]
            pairs = self.tokenizer.encode([query.text] * len(hypotheses), hypotheses)
            items.append(PairsItem(query, pairs))
        if not truncate and any(item.truncated for item in items):
            raise InputTooLong(
                f"Input is longer than the model's {self.manifest.max_tokens} tokens and "
                "truncation was turned off.",
                details={"max_tokens": self.manifest.max_tokens},
            )
        return items

    def cost(self, item: PairsItem) -> int:  # type: ignore[override]
        return sum(p.n_tokens for p in item.pairs)

    def infer(self, batch: list[PairsItem]) -> list[np.ndarray]:  # type: ignore[override]
        outputs, _ = self.run_session([p for item in batch for p in item.pairs])
        logits = outputs[0].astype(np.float64)
        out, start = [], 0
        for item in batch:
            out.append(logits[start : start + len(item.pairs)])
            start += len(item.pairs)
        return out

    def postprocess(self, item: PairsItem, raw: np.ndarray) -> ItemResult:  # type: ignore[override]
        entail = int(self.manifest.config["entailment_id"])
        contra = int(self.manifest.config["contradiction_id"])
        if item.query.multi_label:
            scores = softmax(raw[:, [contra, entail]])[:, 1]
        else:
            scores = softmax(raw[:, entail])
        assert item.query.labels is not None
        return ItemResult(
            label_output(item.query.labels, scores),
            tokens=self.cost(item),
            truncated=item.truncated,
        )

    def warmup(self) -> None:
        self.infer(self.preprocess([LabelsInput("warm up", ("a", "b"))]))
