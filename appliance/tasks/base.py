"""The runner interface every task implements: parse, preprocess, infer, postprocess, warm up.

Runners differ only in pre- and post-processing; sessions, batching and threads are shared
(see appliance.runtime). `infer` runs on the model's worker thread with a merged batch.
"""

from __future__ import annotations

import copy
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
    ONE_PASS: ClassVar[bool] = False
    """A call is one forward pass whose time follows its tokens (`cost`): a lone request's
    small call may run on the event loop (appliance.runtime.batcher). Not for decoders (a
    call is a whole generation), images or custom models (cost says nothing of the time)."""

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

    def with_session(self, session: ort.InferenceSession) -> Runner[In, Prep, Raw]:
        """The same runner (tokenizer, manifest) calling `session`: another session of the
        same model file, with other threads (a lone request's call). Only for a runner whose
        call is one pass over one session: the others hold more sessions or per-call state."""
        if not self.ONE_PASS:
            raise TypeError(f"{type(self).__name__} has no single session to swap")
        twin = copy.copy(self)
        twin.session = session
        return twin

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

    ONE_PASS = True

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

    PAD_WASTE_TOKENS: ClassVar[int | None] = None
    """Split a merged batch where padding would waste more than this many tokens (None: off)."""
    CALL_TOKENS: ClassVar[int | None] = None
    """Padded tokens per model call, at most; one item alone may exceed it (None: off)."""
    # Both are off by default. Measured (`appliance bench`, engine section: all-MiniLM-L6-v2
    # INT8, 2 cores) with 256 and 1024: merged batches of 32 medium texts 1.4-3x faster,
    # mixed lengths 1.6-1.8x, short texts unchanged. But dynamic INT8 quantises activations
    # per tensor, over the whole call: which texts share a call moves each text's result a
    # little, and with the exporter's validation batch (15 short texts + one of 256 tokens,
    # one call) the default model's min cosine falls from 0.986 to 0.979, under the
    # exporter's 0.98 gate. Turn them on once validation runs with the grouping the server
    # uses (in serving, short texts already share calls with short texts: ~0.979 for "hello").

    def run_session(self, batch: list[Encoded]) -> tuple[list[np.ndarray], np.ndarray]:
        """Run the model over the batch; outputs and attention mask in the batch's order.

        Items are padded per call to the longest one, and a call costs about its padded
        tokens, a big one more per token. With PAD_WASTE_TOKENS / CALL_TOKENS set, the batch
        is sorted by length and cut into calls: where padding the items so far up to the next
        length would waste more than PAD_WASTE_TOKENS (one merged batch of short and long
        texts), and where a call would pass CALL_TOKENS. Outputs are put back in the batch's
        order, sequence outputs padded with zeros behind the mask."""
        waste, budget = self.PAD_WASTE_TOKENS, self.CALL_TOKENS
        if waste is None and budget is None:
            arrays = self.tokenizer.pad(batch)
            return self.session.run(None, self.feeds(arrays)), arrays["attention_mask"]
        lengths = [e.n_tokens for e in batch]
        order = sorted(range(len(batch)), key=lengths.__getitem__)
        buckets: list[list[int]] = [[]]
        for i in order:
            bucket = buckets[-1]
            width = lengths[i]  # the longest so far: sorted
            if bucket and (
                (waste is not None and len(bucket) * (width - lengths[bucket[-1]]) > waste)
                or (budget is not None and (len(bucket) + 1) * width > budget)
            ):
                buckets.append([i])
            else:
                bucket.append(i)
        if len(buckets) == 1:
            arrays = self.tokenizer.pad(batch)
            return self.session.run(None, self.feeds(arrays)), arrays["attention_mask"]
        longest = max(lengths)
        mask = np.zeros((len(batch), longest), dtype=np.int64)
        for row, n in enumerate(lengths):
            mask[row, :n] = 1
        declared = [o.shape for o in self.session.get_outputs()]
        merged: list[np.ndarray] = []
        for bucket in buckets:
            width = lengths[bucket[-1]]
            outputs = self.session.run(
                None, self.feeds(self.tokenizer.pad([batch[i] for i in bucket]))
            )
            rows = np.asarray(bucket)
            for k, out in enumerate(outputs):
                sequence = (
                    out.ndim >= 2
                    and out.shape[1] == width
                    and not isinstance((declared[k] + [None, None])[1], int)
                )
                if len(merged) <= k:
                    lead = (len(batch), longest) if sequence else (len(batch),)
                    merged.append(np.zeros(lead + out.shape[2 if sequence else 1 :], out.dtype))
                if sequence:
                    merged[k][rows, :width] = out
                else:
                    merged[k][rows] = out
        return merged, mask
