"""The runner interface every task implements: parse, preprocess, infer, postprocess, warm up.

Runners differ only in pre- and post-processing; sessions, batching and threads are shared
(see appliance.runtime). `infer` runs on the model's worker thread with a merged batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import onnxruntime as ort

from appliance.errors import BatchNotSupported, InputTooLong, ValidationFailed
from appliance.models.manifest import Manifest
from appliance.runtime.tokenizer import Encoded, TextTokenizer

In = TypeVar("In")
Prep = TypeVar("Prep")
Raw = TypeVar("Raw")


@dataclass(frozen=True, slots=True)
class ItemResult:
    output: dict[str, Any]
    tokens: int
    truncated: bool = False


class Runner(ABC, Generic[In, Prep, Raw]):
    task: ClassVar[str]

    def __init__(self, folder: Path, manifest: Manifest, session: ort.InferenceSession) -> None:
        self.folder = folder
        self.manifest = manifest
        self.session = session
        self._input_names = {i.name for i in session.get_inputs()}

    @abstractmethod
    def parse_input(self, payload: Any) -> In:
        """Validate one input object (the predict API's `input`); raise ValidationFailed."""

    @abstractmethod
    def preprocess(self, inputs: list[In], *, truncate: bool = True) -> list[Prep]:
        """Turn inputs into model-ready items (tokenised); cheap enough for a request thread."""

    @abstractmethod
    def cost(self, item: Prep) -> int:
        """Tokens the item occupies in a batch."""

    @abstractmethod
    def infer(self, batch: list[Prep]) -> list[Raw]:
        """One model call over a merged batch; returns one raw result per item."""

    @abstractmethod
    def postprocess(self, item: Prep, raw: Raw) -> ItemResult:
        """The API output for one item."""

    def cacheable(self, item: In) -> bool:
        """Whether the answer for this input may be cached (sampling without a seed: no)."""
        return True

    def warmup(self) -> None:
        example = self.parse_input(self.manifest.example_payload)
        self.infer(self.preprocess([example]))

    def feeds(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: value for name, value in arrays.items() if name in self._input_names}


def require_text(payload: Any, field: str = "text") -> str:
    if not isinstance(payload, dict):
        raise ValidationFailed("`input` must be an object.", details={"field": "input"})
    value = payload.get(field)
    if value is None:
        raise ValidationFailed(f"`{field}` is required.", details={"field": field})
    if isinstance(value, list):
        raise BatchNotSupported(details={"field": field})
    if not isinstance(value, str):
        raise ValidationFailed(f"`{field}` must be a string.", details={"field": field})
    if not value.strip():
        raise ValidationFailed(f"`{field}` must not be empty.", details={"field": field})
    return value


class TextEncoderRunner(Runner[str, Encoded, Raw]):
    """Shared by encoder tasks whose input is one text: tokenise, pad per batch, run."""

    def __init__(self, folder: Path, manifest: Manifest, session: ort.InferenceSession) -> None:
        super().__init__(folder, manifest, session)
        self.tokenizer = TextTokenizer(
            folder / manifest.files["tokenizer"].path,
            max_tokens=manifest.max_tokens,
            pad_token_id=manifest.pad_token_id,
        )

    def parse_input(self, payload: Any) -> str:
        return require_text(payload)

    def preprocess(self, inputs: list[str], *, truncate: bool = True) -> list[Encoded]:
        encoded = self.tokenizer.encode(inputs)
        if not truncate:
            too_long = [i for i, e in enumerate(encoded) if e.truncated]
            if too_long:
                raise InputTooLong(
                    f"Input is longer than the model's {self.manifest.max_tokens} tokens and "
                    "truncation was turned off.",
                    details={"max_tokens": self.manifest.max_tokens, "items": too_long},
                )
        return encoded

    def cost(self, item: Encoded) -> int:
        return item.n_tokens

    def run_session(self, batch: list[Encoded]) -> tuple[list[np.ndarray], np.ndarray]:
        arrays = self.tokenizer.pad(batch)
        outputs = self.session.run(None, self.feeds(arrays))
        return outputs, arrays["attention_mask"]
