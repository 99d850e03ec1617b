"""Extractive question answering (an encoder with start/end logits), SQuAD2-style.

Long contexts are split into overlapping windows (stride from the manifest); the best span
across windows wins, scored as transformers' question-answering pipeline scores it
(softmax of start and end logits over the context tokens, p_start * p_end, spans of at most
max_answer_tokens). The answer is "unknown" when the null answer (the [CLS] position)
scores higher than every span, or the best span scores below min_answer_score.
Earlier turns (prev_q / prev_a) are folded into the question as conversation history.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from appliance.errors import InputTooLong, ValidationFailed
from appliance.models.manifest import Manifest
from appliance.runtime.tokenizer import Encoded, TextTokenizer
from appliance.tasks.base import ItemResult, Runner, require_text

UNKNOWN = "unknown"
MAX_CONTEXT_CHARS = 200_000
MASKED = -10_000.0  # what transformers' pipeline gives non-context logits


@dataclass(frozen=True, slots=True)
class QaInput:
    question: str
    context: str


@dataclass(frozen=True, slots=True)
class Window:
    encoded: Encoded
    offsets: list[tuple[int, int]]
    context_mask: np.ndarray  # True where the token belongs to the context
    words: list[int | None]

    def char_span(self, start: int, end: int) -> tuple[int, int]:
        """Characters of the span, widened to whole words (as transformers' pipeline does)."""
        first, last = self.offsets[start][0], self.offsets[end][1]
        for i, word in enumerate(self.words):
            if self.context_mask[i] and word is not None:
                if word == self.words[start]:
                    first = min(first, self.offsets[i][0])
                if word == self.words[end]:
                    last = max(last, self.offsets[i][1])
        return first, last


@dataclass(frozen=True, slots=True)
class QaItem:
    context: str
    windows: list[Window]


def _strings(payload: dict[str, Any], field: str) -> list[str]:
    value = payload.get(field) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValidationFailed(f"`{field}` must be a list of strings.", details={"field": field})
    return value


def fold_history(question: str, prev_q: list[str], prev_a: list[str]) -> str:
    turns = " ".join(f"{q} {a}" for q, a in zip(prev_q, prev_a, strict=True))
    return f"{turns} {question}".strip()


def best_answer(
    windows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], max_answer_tokens: int
) -> tuple[float, int, int, int, float]:
    """(best span score, window, start, end, null score) over windows of (start logits,
    end logits, context mask). The null score is the lowest over windows, as transformers does."""
    best = (-1.0, -1, 0, 0)
    null = np.inf
    for w, (start, end, context) in enumerate(windows):
        keep = context.copy()
        keep[0] = True  # [CLS] carries the null answer
        s = np.where(keep, start, MASKED).astype(np.float64)
        e = np.where(keep, end, MASKED).astype(np.float64)
        ps = np.exp(s - s.max())
        ps /= ps.sum()
        pe = np.exp(e - e.max())
        pe /= pe.sum()
        null = min(null, float(ps[0] * pe[0]))
        ps[0] = pe[0] = 0.0
        ps[~context] = 0.0
        pe[~context] = 0.0
        scores = np.tril(np.triu(np.outer(ps, pe)), max_answer_tokens - 1)
        flat = int(np.argmax(scores))
        i, j = divmod(flat, scores.shape[1])
        if scores[i, j] > best[0]:
            best = (float(scores[i, j]), w, i, j)
    return best[0], best[1], best[2], best[3], float(null)


class QuestionAnsweringRunner(Runner[QaInput, QaItem, list[tuple[np.ndarray, np.ndarray]]]):
    task = "question-answering"
    ONE_PASS = True  # one encoder pass over the windows

    def __init__(self, folder: Path, manifest: Manifest, session: ort.InferenceSession) -> None:
        super().__init__(folder, manifest, session)
        path = folder / manifest.files["tokenizer"].path
        self.padder = TextTokenizer(
            path, max_tokens=manifest.max_tokens, pad_token_id=manifest.pad_token_id
        )
        self.stride = int(manifest.config.get("doc_stride", min(128, manifest.max_tokens // 4)))
        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_padding()
        self._tok.enable_truncation(manifest.max_tokens, stride=self.stride, strategy="only_second")
        names = [o.name for o in session.get_outputs()]
        self._outputs = [names.index("start_logits"), names.index("end_logits")]

    def parse_input(self, payload: Any) -> QaInput:
        question = require_text(payload, "question")
        context = require_text(payload, "context")
        if len(context) > MAX_CONTEXT_CHARS:
            raise ValidationFailed(
                f"`context` has {len(context)} characters; at most {MAX_CONTEXT_CHARS}.",
                details={"field": "context"},
            )
        prev_q, prev_a = _strings(payload, "prev_q"), _strings(payload, "prev_a")
        if len(prev_q) != len(prev_a):
            raise ValidationFailed(
                "`prev_q` and `prev_a` must have the same length.", details={"field": "prev_a"}
            )
        return QaInput(fold_history(question, prev_q, prev_a), context)

    def preprocess(self, inputs: list[QaInput], *, truncate: bool = True) -> list[QaItem]:
        items = []
        for qa in inputs:
            try:
                first = self._tok.encode(qa.question, qa.context)
            except (
                Exception
            ) as exc:  # tokenizers raises a bare Exception when the question fills the window
                raise self._too_long() from exc
            windows = []
            for enc in [first, *first.overflowing]:
                context = np.array([sid == 1 for sid in enc.sequence_ids], dtype=bool)
                if not context.any():
                    raise self._too_long()
                windows.append(
                    Window(
                        Encoded(enc.ids, enc.type_ids, False),
                        list(enc.offsets),
                        context,
                        enc.word_ids,
                    )
                )
            items.append(QaItem(qa.context, windows))
        return items

    def _too_long(self) -> InputTooLong:
        return InputTooLong(
            "The question leaves no room for the context in the model's "
            f"{self.manifest.max_tokens} tokens.",
            details={"field": "question", "max_tokens": self.manifest.max_tokens},
        )

    def cost(self, item: QaItem) -> int:
        return sum(w.encoded.n_tokens for w in item.windows)

    def infer(self, batch: list[QaItem]) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        flat = [w.encoded for item in batch for w in item.windows]
        arrays = self.padder.pad(flat)
        outputs = self.session.run(None, self.feeds(arrays))
        start, end = outputs[self._outputs[0]], outputs[self._outputs[1]]
        out, k = [], 0
        for item in batch:
            out.append([(start[k + i], end[k + i]) for i in range(len(item.windows))])
            k += len(item.windows)
        return out

    def postprocess(self, item: QaItem, raw: list[tuple[np.ndarray, np.ndarray]]) -> ItemResult:
        scored = [
            (s[: w.encoded.n_tokens], e[: w.encoded.n_tokens], w.context_mask)
            for w, (s, e) in zip(item.windows, raw, strict=True)
        ]
        max_tokens = int(self.manifest.config.get("max_answer_tokens", 15))
        score, w, i, j, null = best_answer(scored, max_tokens)
        threshold = float(self.manifest.config.get("min_answer_score", 0.0))
        if w < 0 or null > score or score < threshold:
            output = {"answer": UNKNOWN, "score": null}
        else:
            first, last = item.windows[w].char_span(i, j)
            output = {"answer": item.context[first:last], "score": score}
        return ItemResult(output, tokens=self.cost(item))

    def warmup(self) -> None:
        example = QaInput("What is the meaning of life?", "The meaning of life is 42.")
        self.infer(self.preprocess([example]))
