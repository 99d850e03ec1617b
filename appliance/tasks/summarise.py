"""Summarisation with seq2seq models (T5, BART, ...) exported with past key values.

Two onnxruntime sessions, numpy in between: the encoder runs once over the batch's texts,
then optimum's merged decoder (`use_cache_branch`) runs once per token: the first call
without a cache computes every layer's cross-attention keys and values from the encoder's
output; later calls feed them back with the growing self-attention cache. Every input brings
its own search (greedy or beam, appliance.tasks.decoding) whose rows leave the batch when
they finish.

The registry opens the session on manifest.files["model"] (the encoder); the runner opens
the decoder (files["decoder"]) with the same providers and threads.

Lengths count the summary's tokens (the decoder start token not included). Defaults come
from the checkpoint's generation config and its task_specific_params["summarization"], as
transformers' summarization pipeline applies them (manifest.config["generation"]).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from appliance.config import RuntimeConfig
from appliance.errors import BatchNotSupported, InputTooLong
from appliance.models.manifest import Manifest
from appliance.runtime.session import create_session
from appliance.runtime.tokenizer import Encoded, TextTokenizer
from appliance.tasks.base import ItemResult, Runner, require_text
from appliance.tasks.decoding import (
    NEG_INF,
    BeamSearch,
    DecodingConfig,
    Search,
    Step,
    apply_repetition_penalty,
    log_softmax,
    make_search,
)
from appliance.tasks.generate import _fail, _integer, _number

MAX_NEW_TOKENS = 512
"""Upper bound of max_length unless the manifest sets `max_new_tokens`."""
MAX_BEAMS = 16
MAX_NGRAM = 64
DEFAULTS: dict[str, Any] = {
    "min_length": 0,
    "max_length": 19,
    "num_beams": 1,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "repetition_penalty": 1.0,
}
"""transformers' own defaults (max_length 20 counts the decoder start token), for manifests
that do not say."""


@dataclass(frozen=True, slots=True)
class SummarisationInput:
    """One validated summarisation input (also the cache key's input)."""

    text: str
    min_length: int
    max_length: int
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0


@dataclass(slots=True)
class SummarisationItem:
    request: SummarisationInput
    encoded: Encoded
    decoding: DecodingConfig

    @property
    def n_input(self) -> int:
        return self.encoded.n_tokens


# ---- searches with the processors decoding.py does not have --------------------------------


def banned_ngram_tokens(sequence: Sequence[int], n: int) -> list[int]:
    """transformers' NoRepeatNGramLogitsProcessor for one row: the tokens that would repeat an
    n-gram already in `sequence` (the decoder's ids, start token included)."""
    if n <= 0 or len(sequence) + 1 < n:
        return []
    seq = list(sequence)
    prefix = seq[len(seq) - n + 1 :] if n > 1 else []
    return [seq[i + n - 1] for i in range(len(seq) - n + 1) if seq[i : i + n - 1] == prefix]


class GuidedSearch(Search):
    """A search of appliance.tasks.decoding plus transformers' no_repeat_ngram_size and forced
    first/last tokens (BART's forced_bos_token_id / forced_eos_token_id), in transformers'
    order: repetition penalty, no-repeat n-grams, (min length, done by the inner search),
    forced tokens.

    The inner search is made with repetition_penalty 1 and given scores already processed.
    A beam search takes the log-softmax of what it is given: so it is given processed
    log-probabilities, and its running scores are raised by the log-sum-exp that its
    renormalisation takes off, which keeps every candidate's total exactly transformers'."""

    def __init__(
        self,
        prompt: Sequence[int],
        config: DecodingConfig,
        *,
        no_repeat_ngram_size: int = 0,
        forced_bos: int | None = None,
        forced_eos: Sequence[int] = (),
    ) -> None:
        super().__init__(prompt, config)
        # Forced EOS wins over min length at the last step, as in transformers.
        min_new = config.min_new_tokens
        if forced_eos:
            min_new = min(min_new, config.max_new_tokens - 1)
        inner = DecodingConfig(
            max_new_tokens=config.max_new_tokens,
            min_new_tokens=min_new,
            length_penalty=config.length_penalty,
            num_beams=config.num_beams,
            eos_token_ids=config.eos_token_ids,
        )
        self.inner = make_search(prompt, inner)
        self.beam = isinstance(self.inner, BeamSearch)
        self.ngram = no_repeat_ngram_size
        self.forced_bos = forced_bos
        self.forced_eos = list(forced_eos)
        self._histories: list[list[int]] = [list(self.prompt)]

    @property
    def rows(self) -> int:
        return self.inner.rows

    def _forced(self) -> list[int] | None:
        # transformers applies forced EOS after forced BOS: at max_length 1, EOS wins.
        if self.forced_eos and self.steps == self.config.max_new_tokens - 1:
            return self.forced_eos
        if self.steps == 0 and self.forced_bos is not None:
            return [self.forced_bos]
        return None

    def step(self, logits: np.ndarray) -> Step:
        scores = logits.astype(np.float32)
        if self.beam:
            scores = log_softmax(scores)
        history = [np.asarray(h, dtype=np.int64) for h in self._histories]
        scores = apply_repetition_penalty(scores, history, self.config.repetition_penalty)
        if self.ngram > 0:
            scores = scores.copy()
            for row, seq in enumerate(self._histories):
                banned = banned_ngram_tokens(seq, self.ngram)
                if banned:
                    scores[row, banned] = NEG_INF
        forced = self._forced()
        if forced is not None:
            scores = np.full_like(scores, NEG_INF)
            scores[:, forced] = 0.0
        if self.beam:
            top = np.max(scores, axis=-1, keepdims=True)
            with np.errstate(divide="ignore"):
                lse = top[:, 0] + np.log(np.sum(np.exp(scores - top), axis=-1))
            # BeamSearch keeps its rows' running scores in `_scores` (decoding.py).
            running = self.inner._scores  # type: ignore[attr-defined]
            self.inner._scores = running + np.where(np.isfinite(lse), lse, 0.0)  # type: ignore[attr-defined]
        step = self.inner.step(scores)
        self.steps += 1
        self._histories = [
            self._histories[p] + [int(t)]
            for p, t in zip(step.parents.tolist(), step.tokens.tolist(), strict=True)
        ]
        return step

    def stop(self) -> None:
        self.inner.stop()

    def results(self) -> list[list[int]]:
        return self.inner.results()

    def partial(self) -> list[int]:
        return self.inner.partial()


# ---- the model loop --------------------------------------------------------------------------


class Seq2SeqLoop:
    """Runs an encoder and optimum's merged decoder (with past) over a set of searches."""

    def __init__(
        self, encoder: ort.InferenceSession, decoder: ort.InferenceSession, config: dict[str, Any]
    ) -> None:
        self.encoder = encoder
        self.decoder = decoder
        self._encoder_inputs = {i.name for i in encoder.get_inputs()}
        inputs = {i.name: i for i in decoder.get_inputs()}
        outputs = [o.name for o in decoder.get_outputs()]
        self.self_past: list[str] = list(config.get("self_past_inputs") or [])
        self.cross_past: list[str] = list(config.get("cross_past_inputs") or [])
        if not self.self_past:
            past = [n for n in inputs if n.startswith("past_key_values.")]
            self.self_past = [n for n in past if ".decoder." in n]
            self.cross_past = [n for n in past if ".encoder." in n]
        present = {n.replace("past_key_values", "present") for n in self.self_past}
        self.self_present = [n.replace("past_key_values", "present") for n in self.self_past]
        self.cross_present = [n.replace("past_key_values", "present") for n in self.cross_past]
        missing = (present | set(self.cross_present) | {"logits"}) - set(outputs)
        if missing or "use_cache_branch" not in inputs:
            raise ValueError(
                "the decoder graph is not an optimum merged seq2seq decoder "
                f"(missing {sorted(missing) or ['use_cache_branch']})"
            )
        first = inputs[self.self_past[0]]
        self.past_dtype = np.float16 if "float16" in first.type else np.float32
        self.heads = int(config.get("num_heads") or first.shape[1])
        self.head_dim = int(config.get("head_dim") or first.shape[3])
        self.start = int(config.get("decoder_start_token_id", 0))

    def encode(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        feeds = {k: v for k, v in arrays.items() if k in self._encoder_inputs}
        (hidden,) = self.encoder.run(["last_hidden_state"], feeds)
        return hidden  # type: ignore[no-any-return]

    def _run(
        self,
        ids: np.ndarray,
        hidden: np.ndarray,
        mask: np.ndarray,
        self_past: list[np.ndarray],
        cross_past: list[np.ndarray] | None,
    ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        rows = ids.shape[0]
        feeds: dict[str, np.ndarray] = {
            "input_ids": ids,
            "encoder_hidden_states": hidden,
            "encoder_attention_mask": mask,
            "use_cache_branch": np.array([cross_past is not None]),
        }
        if cross_past is None:  # first call: the graph's no-cache branch ignores the pasts
            empty = np.zeros((rows, self.heads, 0, self.head_dim), dtype=self.past_dtype)
            feeds.update(dict.fromkeys(self.self_past + self.cross_past, empty))
            names = ["logits", *self.self_present, *self.cross_present]
        else:
            feeds.update(zip(self.self_past, self_past, strict=True))
            feeds.update(zip(self.cross_past, cross_past, strict=True))
            names = ["logits", *self.self_present]
        logits, *present = self.decoder.run(names, feeds)
        n = len(self.self_present)
        return logits[:, -1, :], present[:n], present[n:]

    def generate(self, searches: list[Search], arrays: dict[str, np.ndarray]) -> None:
        """Drive the searches (one per row of the padded encoder inputs `arrays`) to the
        end."""
        hidden = self.encode(arrays)
        mask = arrays["attention_mask"]
        ids = np.full((len(searches), 1), self.start, dtype=np.int64)
        logits, self_past, cross_past = self._run(ids, hidden, mask, [], None)
        counts = [1] * len(searches)  # rows each search owns, in order, in the current batch
        owner = np.arange(len(searches))  # the search (input) of each row
        while True:
            parents: list[np.ndarray] = []
            tokens: list[np.ndarray] = []
            offset = 0
            for s, search in enumerate(searches):
                rows, counts[s] = counts[s], 0
                if rows == 0:
                    continue
                step = search.step(logits[offset : offset + rows])
                if not search.done:
                    parents.append(step.parents + offset)
                    tokens.append(step.tokens)
                    counts[s] = len(step.parents)
                offset += rows
            if not parents:
                return
            index = np.concatenate(parents)
            if len(index) != offset or not np.array_equal(index, np.arange(offset)):
                self_past = [p[index] for p in self_past]
                # The rows of one input share its encoder states and cross-attention cache:
                # beams reordering among themselves leave those as they are.
                if not np.array_equal(owner[index], owner):
                    cross_past = [p[index] for p in cross_past]
                    hidden, mask, owner = hidden[index], mask[index], owner[index]
            logits, self_past, _ = self._run(
                np.concatenate(tokens)[:, None], hidden, mask, self_past, cross_past
            )


# ---- the runner ------------------------------------------------------------------------------


def runtime_of(session: ort.InferenceSession) -> RuntimeConfig:
    """The providers and threads a session was made with (the registry's RuntimeConfig)."""
    options = session.get_session_options()
    return RuntimeConfig(
        providers=list(session.get_providers()),
        intra_op_threads=max(0, options.intra_op_num_threads),
        inter_op_threads=max(1, options.inter_op_num_threads),
    )


class SummarisationRunner(Runner[SummarisationInput, SummarisationItem, list[list[int]]]):
    task = "summarisation"

    def __init__(self, folder: Path, manifest: Manifest, session: ort.InferenceSession) -> None:
        super().__init__(folder, manifest, session)
        cfg = manifest.config
        self.tokenizer = TextTokenizer(
            folder / manifest.files["tokenizer"].path,
            max_tokens=manifest.max_tokens,
            pad_token_id=manifest.pad_token_id,
        )
        self._decoder_tokenizer = Tokenizer.from_file(
            str(folder / manifest.files["tokenizer"].path)
        )
        self.decoder = create_session(
            folder / manifest.files["decoder"].path, runtime_of(session), arena=True
        )
        self.loop = Seq2SeqLoop(session, self.decoder, cfg)
        self.max_new_tokens = max(1, int(cfg.get("max_new_tokens", MAX_NEW_TOKENS)))
        self.eos_ids = tuple(int(t) for t in cfg.get("eos_token_ids", []))
        self.prefix = str(cfg.get("prefix") or "")
        bos = cfg.get("forced_bos_token_id")
        self.forced_bos = int(bos) if isinstance(bos, int) else None
        self.forced_eos = tuple(int(t) for t in cfg.get("forced_eos_token_ids") or [])
        self.start = int(cfg.get("decoder_start_token_id", manifest.pad_token_id))
        defaults = {**DEFAULTS, **(cfg.get("generation") or {})}
        limit = self.max_new_tokens
        self.defaults = {
            **defaults,
            "max_length": max(1, min(int(defaults["max_length"]), limit)),
            "min_length": max(0, min(int(defaults["min_length"]), limit)),
            "num_beams": max(1, min(int(defaults["num_beams"]), MAX_BEAMS)),
        }

    # ---- input ---------------------------------------------------------------------------

    def parse_input(self, payload: Any) -> SummarisationInput:
        """Validate one input; every error names its field (422). A length given alone moves
        the other default out of its way (max_length 5 with a default min_length of 30 is
        min_length 5); both given must agree."""
        if isinstance(payload, dict) and isinstance(payload.get("text"), list):
            raise BatchNotSupported(details={"field": "text"})
        text = require_text(payload)
        d, limit = self.defaults, self.max_new_tokens
        given_min = payload.get("min_length") is not None
        given_max = payload.get("max_length") is not None
        min_length = _integer(payload, "min_length", d["min_length"], 0, limit)
        max_length = _integer(payload, "max_length", d["max_length"], 1, limit)
        if max_length < min_length:
            if given_min and given_max:
                raise _fail(
                    "max_length", f"({max_length}) must not be below min_length ({min_length})."
                )
            if given_max:
                min_length = max_length
            else:
                max_length = min_length
        num_beams = _integer(payload, "num_beams", d["num_beams"], 1, MAX_BEAMS)
        length_penalty = _number(payload, "length_penalty", float(d["length_penalty"]))
        ngram = _integer(payload, "no_repeat_ngram_size", d["no_repeat_ngram_size"], 0, MAX_NGRAM)
        repetition_penalty = _number(payload, "repetition_penalty", float(d["repetition_penalty"]))
        if repetition_penalty <= 0:
            raise _fail("repetition_penalty", "must be above 0.")
        return SummarisationInput(
            text=text,
            min_length=min_length,
            max_length=max_length,
            num_beams=num_beams,
            length_penalty=length_penalty,
            no_repeat_ngram_size=ngram,
            repetition_penalty=repetition_penalty,
        )

    def decoding(self, request: SummarisationInput) -> DecodingConfig:
        return DecodingConfig(
            max_new_tokens=request.max_length,
            min_new_tokens=request.min_length,
            repetition_penalty=request.repetition_penalty,
            length_penalty=request.length_penalty,
            num_beams=request.num_beams,
            eos_token_ids=self.eos_ids,
        )

    def preprocess(
        self, inputs: list[SummarisationInput], *, truncate: bool = True
    ) -> list[SummarisationItem]:
        encoded = self.tokenizer.encode([self.prefix + i.text for i in inputs])
        if not truncate:
            too_long = [n for n, e in enumerate(encoded) if e.truncated]
            if too_long:
                raise InputTooLong(
                    f"Input is longer than the model's {self.manifest.max_tokens} tokens and "
                    "truncation was turned off.",
                    details={"max_tokens": self.manifest.max_tokens, "items": too_long},
                )
        return [
            SummarisationItem(request, e, self.decoding(request))
            for request, e in zip(inputs, encoded, strict=True)
        ]

    budget_fields = ("text", "max_length", "num_beams")
    """The request fields that make `positions` (named by the 422 over the budget)."""

    def positions(self, item: SummarisationItem) -> int:
        """Worst-case cache positions: each beam holds the encoder's cross-attention cache
        and may grow to max_length decoder positions (Inference refuses a request over
        limits.max_generation_positions before it runs)."""
        return item.request.num_beams * (item.n_input + item.request.max_length)

    def cost(self, item: SummarisationItem) -> int:
        """A reservation: the input (encoded once, its states shared by the beams) and, for
        every beam, the most tokens the summary may have: each beam is a decoder row that
        runs every step, as generation charges its rows."""
        return item.n_input + item.request.num_beams * item.request.max_length

    # ---- model ---------------------------------------------------------------------------

    def search(self, item: SummarisationItem) -> Search:
        request = item.request
        if request.no_repeat_ngram_size or self.forced_bos is not None or self.forced_eos:
            return GuidedSearch(
                [self.start],
                item.decoding,
                no_repeat_ngram_size=request.no_repeat_ngram_size,
                forced_bos=self.forced_bos,
                forced_eos=self.forced_eos,
            )
        return make_search([self.start], item.decoding)

    def infer(self, batch: list[SummarisationItem]) -> list[list[list[int]]]:
        searches = [self.search(item) for item in batch]
        self.loop.generate(searches, self.tokenizer.pad([item.encoded for item in batch]))
        return [search.results() for search in searches]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._decoder_tokenizer.decode(list(ids), skip_special_tokens=True))

    def postprocess(self, item: SummarisationItem, raw: list[list[int]]) -> ItemResult:
        best = raw[0] if raw else []
        # Billed per beam, as reserved: every beam ran as many steps as the longest result.
        steps = max((len(ids) for ids in raw), default=0)
        tokens = min(item.n_input + item.request.num_beams * steps, self.cost(item))
        return ItemResult(
            {"output": self.decode(best).strip()},
            tokens=tokens,
            truncated=item.encoded.truncated,
        )

    def warmup(self) -> None:
        # Two tokens exercise both decoder branches; a whole summary would only delay
        # readiness.
        example = dict(self.manifest.example_payload or {"text": "Hello"})
        example.update(min_length=0, max_length=2, num_beams=1)
        self.infer(self.preprocess([self.parse_input(example)]))
