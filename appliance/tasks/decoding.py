"""Decoding in numpy: logits processors, and greedy, sampling and beam searches that work over
any model giving next-token logits per row, so decoder-only and seq2seq runners share them.

A search owns some rows of the model's batch. At each step it is given the last-position
logits of its rows and answers which rows go on (`parents`: the row each next row continues)
with which token. Rows may fan out (the first step of a beam search, or of several samples,
grows from the prompt's single row) or drop out (a finished sequence), so the caller gathers
its key/value cache by `parents` and never computes a finished row again.

The processors follow transformers' generate() (same order, same arithmetic), so a model's
greedy and beam outputs can be compared token for token with the PyTorch original.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NEG_INF = -np.inf
# transformers' beam search marks impossible beams with this score rather than -inf.
_FINISHED = -1.0e9


@dataclass(frozen=True, slots=True)
class DecodingConfig:
    """How to decode one input. Lengths count generated tokens, not the prompt."""

    max_new_tokens: int
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    """0: every token is a candidate."""
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    """Beam search: a finished beam scores sum(log p) / generated_length ** length_penalty."""
    num_beams: int = 1
    num_return_sequences: int = 1
    seed: int | None = None
    """Seeds the sampler: the same seed and input give the same output."""
    eos_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Step:
    parents: np.ndarray
    """For each row of the next step, the index of the row (of this step) it continues."""
    tokens: np.ndarray
    """The token each continuing row appends."""


# ---- processors ------------------------------------------------------------------------------


def log_softmax(scores: np.ndarray) -> np.ndarray:
    top = np.max(scores, axis=-1, keepdims=True)
    shifted = scores - np.where(np.isfinite(top), top, 0.0)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def softmax(scores: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(scores))


def apply_repetition_penalty(
    scores: np.ndarray, histories: Sequence[np.ndarray], penalty: float
) -> np.ndarray:
    """Tokens already in a row's text (prompt and generated) get score / penalty when positive,
    score * penalty when negative: penalty > 1 discourages repeating them, < 1 encourages it."""
    if penalty == 1.0:
        return scores
    out = scores.copy()
    for row, history in enumerate(histories):
        seen = np.unique(history)
        picked = out[row, seen]
        out[row, seen] = np.where(picked < 0, picked * penalty, picked / penalty)
    return out


def suppress(scores: np.ndarray, token_ids: Sequence[int]) -> np.ndarray:
    """Make tokens impossible (e.g. EOS before min_new_tokens)."""
    if not token_ids:
        return scores
    out = scores.copy()
    out[:, list(token_ids)] = NEG_INF
    return out


def apply_temperature(scores: np.ndarray, temperature: float) -> np.ndarray:
    return scores if temperature == 1.0 else scores / temperature


def top_k_filter(scores: np.ndarray, k: int) -> np.ndarray:
    """Keep the k highest scores of each row (ties with the k-th are kept); k=0 keeps all."""
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = -np.partition(-scores, k - 1, axis=-1)[:, k - 1 : k]
    return np.where(scores < kth, NEG_INF, scores)


def top_p_filter(scores: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filter: keep the most likely tokens whose probabilities add up to p (the token
    that crosses p included, and always at least one)."""
    if p >= 1.0:
        return scores
    order = np.argsort(scores, axis=-1, kind="stable")  # ascending, as transformers does
    ascending = np.take_along_axis(scores, order, axis=-1)
    cumulative = np.cumsum(softmax(ascending), axis=-1)
    remove_sorted = cumulative <= (1.0 - p)
    remove_sorted[:, -1] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, NEG_INF, scores)


def process(
    scores: np.ndarray,
    histories: Sequence[np.ndarray],
    generated: int,
    config: DecodingConfig,
) -> np.ndarray:
    """transformers' processor order: repetition penalty, min length; then, when sampling,
    temperature, top-k, top-p."""
    scores = apply_repetition_penalty(scores, histories, config.repetition_penalty)
    if generated < config.min_new_tokens:
        scores = suppress(scores, config.eos_token_ids)
    if config.do_sample:
        scores = apply_temperature(scores, config.temperature)
        scores = top_k_filter(scores, config.top_k)
        scores = top_p_filter(scores, config.top_p)
    return scores


def sample_rows(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token per row, drawn from softmax(scores) by inverse CDF (reproducible per seed)."""
    cumulative = np.cumsum(softmax(scores.astype(np.float64)), axis=-1)
    draws = rng.random(scores.shape[0]) * cumulative[:, -1]
    picked = np.array(
        [np.searchsorted(c, d, side="right") for c, d in zip(cumulative, draws, strict=True)]
    )
    # A draw can land past the last kept token by rounding: step back onto a finite score.
    picked = np.minimum(picked, scores.shape[-1] - 1)
    for row, token in enumerate(picked):
        if not np.isfinite(scores[row, token]):
            picked[row] = int(np.argmax(scores[row]))
    return picked.astype(np.int64)


# ---- searches --------------------------------------------------------------------------------


class Search(ABC):
    """One input's decoding: which rows it owns, how it picks tokens, what it returns."""

    def __init__(self, prompt: Sequence[int], config: DecodingConfig) -> None:
        self.prompt = np.asarray(prompt, dtype=np.int64)
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        self.steps = 0
        self.eos = set(config.eos_token_ids)

    @property
    @abstractmethod
    def rows(self) -> int:
        """Rows this search needs in the next model call (0: done)."""

    @property
    def done(self) -> bool:
        return self.rows == 0

    @abstractmethod
    def step(self, logits: np.ndarray) -> Step:
        """Consume the last-position logits of this search's rows ([rows, vocab])."""

    @abstractmethod
    def results(self) -> list[list[int]]:
        """Generated token ids of each returned sequence, best first (EOS excluded)."""

    @abstractmethod
    def stop(self) -> None:
        """End now (the caller went away): results() gives what was generated so far."""

    @abstractmethod
    def partial(self) -> list[int]:
        """The best (or first) sequence so far, for streaming."""


class SampleSearch(Search):
    """Greedy decoding (argmax) or sampling, num_return_sequences independent rows."""

    def __init__(self, prompt: Sequence[int], config: DecodingConfig) -> None:
        super().__init__(prompt, config)
        self._running: list[list[int]] = [[]]  # one row (the prompt) before the first step
        self._slots: list[int] = [0]  # which returned sequence each running row fills
        self._outputs: list[list[int]] = [[] for _ in range(config.num_return_sequences)]

    @property
    def rows(self) -> int:
        return len(self._running)

    def step(self, logits: np.ndarray) -> Step:
        cfg = self.config
        if self.steps == 0 and cfg.num_return_sequences > 1:
            # Fan out: every returned sequence starts from the prompt's row.
            fan = cfg.num_return_sequences
            logits = np.repeat(logits[:1], fan, axis=0)
            self._running = [[] for _ in range(fan)]
            self._slots = list(range(fan))
            parents = np.zeros(fan, dtype=np.int64)
        else:
            parents = np.arange(len(self._running), dtype=np.int64)
        histories = [np.concatenate([self.prompt, np.asarray(r, np.int64)]) for r in self._running]
        scores = process(logits.astype(np.float32), histories, self.steps, cfg)
        if cfg.do_sample:
            tokens = sample_rows(scores, self.rng)
        else:
            tokens = np.argmax(scores, axis=-1).astype(np.int64)
        self.steps += 1
        keep: list[int] = []
        for row, token in enumerate(tokens.tolist()):
            finished = token in self.eos
            if not finished:
                self._running[row].append(token)
            if finished or self.steps >= cfg.max_new_tokens:
                self._outputs[self._slots[row]] = self._running[row]
            else:
                keep.append(row)
        self._running = [self._running[r] for r in keep]
        self._slots = [self._slots[r] for r in keep]
        return Step(parents=parents[keep], tokens=tokens[keep])

    def stop(self) -> None:
        for row, slot in enumerate(self._slots):
            self._outputs[slot] = self._running[row]
        self._running, self._slots = [], []

    def results(self) -> list[list[int]]:
        return [list(o) for o in self._outputs]

    def partial(self) -> list[int]:
        if 0 in self._slots:
            return list(self._running[self._slots.index(0)])
        return list(self._outputs[0])


@dataclass(slots=True)
class _Hypothesis:
    score: float
    tokens: list[int]


class BeamSearch(Search):
    """transformers' beam search (early_stopping=False): keep the 2*num_beams best
    continuations of all beams, finish those ending in EOS (or at max length) among the top
    num_beams, continue the best num_beams unfinished ones; stop when no running beam can
    beat the worst finished one. Sampling (do_sample) draws the continuations instead."""

    def __init__(self, prompt: Sequence[int], config: DecodingConfig) -> None:
        super().__init__(prompt, config)
        self._running: list[list[int]] = [[]]
        self._scores = np.zeros(1, dtype=np.float64)
        self._finished: list[_Hypothesis] = []
        self._improvable = True
        self._over = False

    @property
    def rows(self) -> int:
        return 0 if self._over else len(self._running)

    def _penalised(self, score: float, length: int) -> float:
        return score / (max(length, 1) ** self.config.length_penalty)

    def _candidates(self, flat: np.ndarray, k: int) -> np.ndarray:
        if self.config.do_sample:
            probs = softmax(flat[None, :].astype(np.float64))[0]
            k = min(k, int(np.count_nonzero(probs > 0)))
            return self.rng.choice(flat.size, size=k, replace=False, p=probs)
        top = np.argpartition(-flat, k - 1)[:k]
        return top[np.argsort(-flat[top], kind="stable")]

    def step(self, logits: np.ndarray) -> Step:
        cfg = self.config
        beams = cfg.num_beams
        vocab = logits.shape[-1]
        histories = [np.concatenate([self.prompt, np.asarray(r, np.int64)]) for r in self._running]
        logp = process(log_softmax(logits.astype(np.float32)), histories, self.steps, cfg)
        total = (logp.astype(np.float64) + self._scores[:, None]).reshape(-1)
        k = min(max(2, 1 + len(self.eos)) * beams, total.size)
        picked = self._candidates(total, k)
        parent, token = picked // vocab, picked % vocab
        score = total[picked]
        self.steps += 1
        length = self.steps
        at_max = length >= cfg.max_new_tokens
        hits = np.array([at_max or int(t) in self.eos for t in token.tolist()], dtype=bool)

        # Finished: only among the top num_beams candidates, and only while it can matter.
        if self._improvable:
            for j in range(min(beams, k)):
                if hits[j] and np.isfinite(score[j]):
                    tokens = list(self._running[parent[j]])
                    if int(token[j]) not in self.eos:
                        tokens.append(int(token[j]))
                    self._finished.append(_Hypothesis(self._penalised(score[j], length), tokens))
            self._finished.sort(key=lambda h: h.score, reverse=True)
            del self._finished[beams:]

        # Running: the best num_beams candidates that did not finish.
        open_ = [j for j in range(k) if not hits[j] and score[j] > _FINISHED / 2]
        open_ = sorted(open_, key=lambda j: -score[j])[:beams]  # sampled ones come unsorted
        self._running = [self._running[parent[j]] + [int(token[j])] for j in open_]
        self._scores = score[open_].astype(np.float64)

        if self._improvable and len(self._finished) >= beams and open_:
            best_possible = self._penalised(float(self._scores[0]), length)
            self._improvable = best_possible > self._finished[-1].score
        self._over = not open_ or not self._improvable or at_max
        return Step(parents=parent[open_].astype(np.int64), tokens=token[open_].astype(np.int64))

    def stop(self) -> None:
        self._over = True

    def partial(self) -> list[int]:
        if self._running:
            return list(self._running[0])
        best = self.results()
        return best[0] if best else []

    def results(self) -> list[list[int]]:
        pool = list(self._finished)
        wanted = self.config.num_return_sequences
        if len(pool) < wanted:  # stopped early: fill with the best running beams
            length = max(self.steps, 1)
            pool += [
                _Hypothesis(self._penalised(float(s), length), list(r))
                for s, r in zip(self._scores, self._running, strict=True)
            ]
            pool.sort(key=lambda h: h.score, reverse=True)
        return [h.tokens for h in pool[:wanted]]


def make_search(prompt: Sequence[int], config: DecodingConfig) -> Search:
    return BeamSearch(prompt, config) if config.num_beams > 1 else SampleSearch(prompt, config)
