"""Text generation with decoder-only models (GPT-2, Llama, ...) exported with past key values.

The loop is numpy over one onnxruntime session: a prefill call over the left-padded prompts,
then one call per token feeding the previous call's key/value cache. Every input of a merged
batch brings its own search (greedy, sampling or beam, see appliance.tasks.decoding); rows
that finish leave the batch, so nobody pays for a finished sequence.

Lengths follow the task API (seeds/task-api.txt): `min_length` and `max_length` count the
tokens to generate; the output is the prompt followed by its continuation.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from appliance.errors import BatchNotSupported, InputTooLong, ValidationFailed
from appliance.models.manifest import Manifest
from appliance.tasks.base import ItemResult, Runner, require_text
from appliance.tasks.decoding import DecodingConfig, Search, make_search

DEFAULT_MAX_LENGTH = 20
MAX_NEW_TOKENS = 1024
"""Upper bound of max_length unless the manifest sets `max_new_tokens`."""
MAX_BEAMS = 16
MAX_GENERATIONS = 16
PREFILL_LOGITS_BYTES = 256 << 20
"""Graphs exported before the exporter cut the LM head to the last position (manifest config
`last_position_logits`) return logits for every position they are fed: prefill in row chunks,
and long prompts in position spans fed through the cache, whose logits stay under this many
bytes (one 6,000-token SmolLM2 row at once would be 1.2 GB of logits). The spans also bound
the attention scores of a long prompt, so newer graphs are prefilled the same way."""
SAMPLING_FIELDS = ("temperature", "top_k", "top_p")


@dataclass(frozen=True, slots=True)
class GenerationInput:
    """One validated text-generation input (also the cache key's input)."""

    text: str
    min_length: int = 0
    max_length: int = DEFAULT_MAX_LENGTH
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    num_beams: int = 1
    num_generations: int = 1
    seed: int | None = None


@dataclass(slots=True)
class GenerationItem:
    """A tokenised input. `listener` (streaming) hears the generated ids after every step,
    and whether they are final; setting `cancelled` ends its search at the next step."""

    request: GenerationInput
    prompt_ids: list[int]
    truncated: bool
    decoding: DecodingConfig
    listener: Callable[[list[int], bool], None] | None = field(default=None, compare=False)
    cancelled: threading.Event | None = field(default=None, compare=False)
    steps: int = field(default=0, compare=False)
    """Model steps its search ran (set by infer): beam rows are billed for every step."""

    @property
    def n_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def rows(self) -> int:
        """Rows of the batch (and of the key/value cache) the item holds: its beams, or its
        independent generations."""
        r = self.request
        return r.num_beams if r.num_beams > 1 else r.num_generations


# ---- validation ------------------------------------------------------------------------------


def _fail(field_name: str, message: str) -> ValidationFailed:
    return ValidationFailed(f"`{field_name}` {message}", details={"field": field_name})


def _integer(payload: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = payload.get(name)
    if value is None:
        return default
    # JSON has one number type: accept 3.0 as 3, never true/false.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(name, "must be an integer.")
    if not lo <= value <= hi:
        raise _fail(name, f"must be between {lo} and {hi} (got {value}).")
    return value


def _number(payload: dict[str, Any], name: str, default: float) -> float:
    value = payload.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(name, "must be a number.")
    if not math.isfinite(value):
        raise _fail(name, "must be a finite number.")
    return float(value)


def parse_generation_input(payload: Any, *, max_new_tokens: int) -> GenerationInput:
    """Validate the task API's generation fields; every error names its field (422).

    Greedy unless sampling is asked for: a temperature above 0, top_k above 0 or top_p below
    1 samples; temperature 0 is always greedy. Several generations without beams also
    sample (identical greedy copies would be useless)."""
    text = require_text(payload)
    min_length = _integer(payload, "min_length", 0, 0, max_new_tokens)
    max_length = _integer(payload, "max_length", DEFAULT_MAX_LENGTH, 1, max_new_tokens)
    if max_length < min_length:
        raise _fail("max_length", f"({max_length}) must not be below min_length ({min_length}).")
    temperature = _number(payload, "temperature", 1.0)
    if temperature < 0:
        raise _fail("temperature", "must be 0 or more.")
    top_k = _integer(payload, "top_k", 0, 0, 1 << 31)
    top_p = _number(payload, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise _fail("top_p", "must be in (0, 1].")
    repetition_penalty = _number(payload, "repetition_penalty", 1.0)
    if repetition_penalty <= 0:
        raise _fail("repetition_penalty", "must be above 0.")
    length_penalty = _number(payload, "length_penalty", 1.0)
    num_beams = _integer(payload, "num_beams", 1, 1, MAX_BEAMS)
    num_generations = _integer(payload, "num_generations", 1, 1, MAX_GENERATIONS)
    seed = payload.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise _fail("seed", "must be a non-negative integer.")
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise _fail("stream", "must be true or false.")

    asked = {
        "temperature": payload.get("temperature") is not None and temperature > 0,
        "top_k": top_k > 0,
        "top_p": top_p < 1,
    }
    greedy_forced = payload.get("temperature") is not None and temperature == 0
    do_sample = not greedy_forced and (
        any(asked.values()) or (num_generations > 1 and num_beams == 1)
    )
    if num_generations > 1 and num_beams == 1 and greedy_forced:
        raise _fail(
            "num_generations",
            "above 1 needs sampling (temperature above 0) or num_beams >= num_generations.",
        )
    if num_beams > 1 and num_generations > num_beams:
        raise _fail("num_generations", f"must not exceed num_beams ({num_beams}).")
    return GenerationInput(
        text=text,
        min_length=min_length,
        max_length=max_length,
        do_sample=do_sample,
        temperature=temperature if do_sample else 1.0,
        top_k=top_k if do_sample else 0,
        top_p=top_p if do_sample else 1.0,
        repetition_penalty=repetition_penalty,
        length_penalty=length_penalty,
        num_beams=num_beams,
        num_generations=num_generations,
        seed=seed if do_sample else None,
    )


# ---- text ------------------------------------------------------------------------------------


class TextAssembler:
    """Turns generated ids into text that continues the prompt exactly: decoding a few prompt
    tokens with the new ones keeps the leading space that some tokenizers drop from a
    sequence's first token, and a piece ending in half a UTF-8 character waits."""

    CONTEXT = 4

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int]) -> None:
        self._tok = tokenizer
        self._context = list(prompt_ids[-self.CONTEXT :])
        self._prefix = tokenizer.decode(self._context, skip_special_tokens=True)
        self.emitted = ""

    def text(self, generated: Sequence[int]) -> str:
        if not generated:
            return ""
        full = self._tok.decode(self._context + list(generated), skip_special_tokens=True)
        if full.startswith(self._prefix):
            return full[len(self._prefix) :]
        return str(self._tok.decode(list(generated), skip_special_tokens=True))

    def piece(self, generated: Sequence[int], final: bool = False) -> str:
        """The text not yet emitted (held back while it ends mid-character, unless final)."""
        text = self.text(generated)
        if (not final and text.endswith("\ufffd")) or not text.startswith(self.emitted):
            return ""
        piece, self.emitted = text[len(self.emitted) :], text
        return piece


# ---- the model loop --------------------------------------------------------------------------


class DecoderLoop:
    """Runs a decoder-only ONNX graph with past key values over a set of searches."""

    def __init__(self, session: ort.InferenceSession, config: dict[str, Any]) -> None:
        self.session = session
        inputs = {i.name: i for i in session.get_inputs()}
        self.past_names: list[str] = list(
            config.get("past_inputs") or [n for n in inputs if n.startswith("past_key_values.")]
        )
        outputs = [o.name for o in session.get_outputs()]
        self.present_names: list[str] = list(
            config.get("present_outputs") or [n for n in outputs if n.startswith("present")]
        )
        self.has_positions = "position_ids" in inputs
        self.pad_id = int(config.get("pad_token_id", 0))
        first = inputs[self.past_names[0]] if self.past_names else None
        self.past_dtype = np.float16 if first and "float16" in first.type else np.float32
        self.kv_heads = int(config.get("num_kv_heads") or (first.shape[1] if first else 1))
        self.head_dim = int(config.get("head_dim") or (first.shape[3] if first else 1))
        self.vocab = int(config.get("vocab_size", 0))
        self._outputs = ["logits", *self.present_names]

    def _run(
        self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": mask}
        if self.has_positions:
            feeds["position_ids"] = positions
        feeds.update(zip(self.past_names, past, strict=True))
        logits, *present = self.session.run(self._outputs, feeds)
        return logits[:, -1, :], present

    def _prefill(
        self, prompts: list[list[int]]
    ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, np.ndarray]:
        rows, length = len(prompts), max(len(p) for p in prompts)
        ids = np.full((rows, length), self.pad_id, dtype=np.int64)
        mask = np.zeros((rows, length), dtype=np.int64)
        for r, prompt in enumerate(prompts):  # left padding: every row ends at the same place
            ids[r, length - len(prompt) :] = prompt
            mask[r, length - len(prompt) :] = 1
        positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1)
        vocab = self.vocab or 50_000
        chunk = max(1, PREFILL_LOGITS_BYTES // (length * vocab * 4))
        logits: list[np.ndarray] = []
        presents: list[list[np.ndarray]] = []
        for start in range(0, rows, chunk):
            part = slice(start, start + chunk)
            n = len(ids[part])
            empty = np.zeros((n, self.kv_heads, 0, self.head_dim), dtype=self.past_dtype)
            present = [empty] * len(self.past_names)
            span = max(1, PREFILL_LOGITS_BYTES // (n * vocab * 4))
            for at in range(0, length, span):
                cols = slice(at, at + span)
                last, present = self._run(
                    ids[part, cols], mask[part, : at + span], positions[part, cols], present
                )
            logits.append(last)
            presents.append(present)
        past = [np.concatenate(p, axis=0) for p in zip(*presents, strict=True)]
        return np.concatenate(logits, axis=0), past, mask, positions[:, -1]

    def generate(
        self,
        searches: list[Search],
        prompts: list[list[int]],
        after_step: Callable[[int], None] | None = None,
        cancelled: Callable[[int], bool] | None = None,
    ) -> None:
        """Drive the searches to the end. `after_step(i)` is told search i advanced;
        `cancelled(i)` ends search i early."""
        logits, past, mask, last_pos = self._prefill(prompts)
        counts = [1] * len(searches)  # rows each search owns, in order, in the current batch
        while True:
            parents: list[np.ndarray] = []
            tokens: list[np.ndarray] = []
            offset = 0
            for s, search in enumerate(searches):
                rows, counts[s] = counts[s], 0
                if rows == 0:
                    continue
                if cancelled is not None and cancelled(s):
                    search.stop()
                else:
                    step = search.step(logits[offset : offset + rows])
                    if not search.done:
                        parents.append(step.parents + offset)
                        tokens.append(step.tokens)
                        counts[s] = len(step.parents)
                    if after_step is not None:
                        after_step(s)
                offset += rows
            if not parents:
                return
            index = np.concatenate(parents)
            if len(index) != offset or not np.array_equal(index, np.arange(offset)):
                past = [p[index] for p in past]
                mask, last_pos = mask[index], last_pos[index]
            mask = np.concatenate([mask, np.ones((len(index), 1), dtype=np.int64)], axis=1)
            last_pos = last_pos + 1
            logits, past = self._run(np.concatenate(tokens)[:, None], mask, last_pos[:, None], past)


# ---- the runner ------------------------------------------------------------------------------


class GenerationRunner(Runner[GenerationInput, GenerationItem, list[list[int]]]):
    task = "text-generation"

    def __init__(self, folder: Path, manifest: Manifest, session: ort.InferenceSession) -> None:
        super().__init__(folder, manifest, session)
        cfg = manifest.config
        self.tokenizer = Tokenizer.from_file(str(folder / manifest.files["tokenizer"].path))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.max_positions = int(cfg.get("max_positions") or manifest.max_tokens)
        self.max_new_tokens = max(
            1, min(int(cfg.get("max_new_tokens", MAX_NEW_TOKENS)), self.max_positions - 1)
        )
        self.eos_ids = tuple(int(t) for t in cfg.get("eos_token_ids", []))
        bos = cfg.get("bos_token_id")
        self.bos_id = int(bos) if isinstance(bos, int) else None
        self.loop = DecoderLoop(session, {"pad_token_id": manifest.pad_token_id, **cfg})

    def parse_input(self, payload: Any) -> GenerationInput:
        if isinstance(payload, dict) and isinstance(payload.get("text"), list):
            raise BatchNotSupported(details={"field": "text"})
        return parse_generation_input(payload, max_new_tokens=self.max_new_tokens)

    def decoding(self, request: GenerationInput) -> DecodingConfig:
        return DecodingConfig(
            max_new_tokens=request.max_length,
            min_new_tokens=request.min_length,
            do_sample=request.do_sample,
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            repetition_penalty=request.repetition_penalty,
            length_penalty=request.length_penalty,
            num_beams=request.num_beams,
            num_return_sequences=request.num_generations,
            seed=request.seed,
            eos_token_ids=self.eos_ids,
        )

    def preprocess(
        self, inputs: list[GenerationInput], *, truncate: bool = True
    ) -> list[GenerationItem]:
        encodings = self.tokenizer.encode_batch([i.text for i in inputs])
        items = []
        for n, (request, encoding) in enumerate(zip(inputs, encodings, strict=True)):
            ids = list(encoding.ids)
            if not ids:
                if self.bos_id is None:
                    raise ValidationFailed(
                        "`text` gives no tokens with this model's tokenizer.",
                        details={"field": "text", "item": n},
                    )
                ids = [self.bos_id]
            room = self.max_positions - request.max_length
            truncated = len(ids) > room
            if truncated:
                if not truncate:
                    raise InputTooLong(
                        f"The prompt has {len(ids)} tokens; with max_length "
                        f"{request.max_length} this model takes at most {room}, and "
                        "truncation was turned off.",
                        details={"max_tokens": room, "items": [n]},
                    )
                # Keep the end of the prompt: it is what the continuation follows. A leading
                # BOS stays, since the model was trained to see it first.
                keep_bos = ids[0] == self.bos_id
                ids = ids[:1] + ids[len(ids) - room + 1 :] if keep_bos else ids[-room:]
            items.append(GenerationItem(request, ids, truncated, self.decoding(request)))
        return items

    budget_fields = ("text", "max_length", "num_beams", "num_generations")
    """The request fields that make `positions` (named by the 422 over the budget)."""

    def positions(self, item: GenerationItem) -> int:
        """Worst-case key/value-cache positions: every row holds the prompt and may grow to
        max_length new tokens (Inference refuses a request over limits.max_generation_positions
        before it runs)."""
        return item.rows * (item.n_prompt + item.request.max_length)

    def cost(self, item: GenerationItem) -> int:
        """A reservation: every row (beam or generation) runs over the prompt and may
        generate max_length tokens."""
        return self.positions(item)

    def cacheable(self, item: GenerationInput) -> bool:
        return not item.do_sample or item.seed is not None

    def infer(self, batch: list[GenerationItem]) -> list[list[list[int]]]:
        searches = [make_search(item.prompt_ids, item.decoding) for item in batch]

        def after_step(i: int) -> None:
            listener = batch[i].listener
            if listener is not None:
                listener(searches[i].partial(), searches[i].done)

        def cancelled(i: int) -> bool:
            event = batch[i].cancelled
            return event is not None and event.is_set()

        self.loop.generate(searches, [item.prompt_ids for item in batch], after_step, cancelled)
        for item, search in zip(batch, searches, strict=True):
            item.steps = search.steps
        return [search.results() for search in searches]

    def watch(
        self, item: GenerationItem, emit: Callable[[str], None], cancelled: threading.Event
    ) -> None:
        """Stream `item`: `emit` is called (on the model's thread) with each new piece of
        text; setting `cancelled` ends the generation at the next token."""
        if item.request.num_beams > 1 or item.request.num_generations > 1:
            raise ValidationFailed(
                "`stream` needs num_beams 1 and num_generations 1.", details={"field": "stream"}
            )
        assembler = self.assembler(item)

        def listen(ids: list[int], done: bool) -> None:
            if piece := assembler.piece(ids, final=done):
                emit(piece)

        item.listener, item.cancelled = listen, cancelled

    def assembler(self, item: GenerationItem) -> TextAssembler:
        return TextAssembler(self.tokenizer, item.prompt_ids)

    def postprocess(self, item: GenerationItem, raw: list[list[int]]) -> ItemResult:
        assembler = self.assembler(item)
        texts = [item.request.text + assembler.text(ids) for ids in raw]
        # Billed per row, as reserved: beams all run every step; independent generations
        # leave the batch when they finish.
        if item.request.num_beams > 1:
            generated = item.rows * max(item.steps, max((len(ids) for ids in raw), default=0))
        else:
            generated = sum(len(ids) for ids in raw)
        output: dict[str, Any] = {"output": texts if item.request.num_generations > 1 else texts[0]}
        tokens = min(item.rows * item.n_prompt + generated, self.cost(item))
        return ItemResult(output, tokens=tokens, truncated=item.truncated)

    def warmup(self) -> None:
        # Two tokens exercise the prefill and the cached step; a full example would only
        # delay readiness.
        example = dict(self.manifest.example_payload or {"text": "Hello"})
        example.update(max_length=2, min_length=0, num_beams=1, num_generations=1)
        self.infer(self.preprocess([self.parse_input(example)]))
