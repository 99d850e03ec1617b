"""The numpy decoding utilities, without a model: processors (checked against transformers'
own), greedy / sampling / beam searches driven by toy scoring functions."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from appliance.tasks.decoding import (
    BeamSearch,
    DecodingConfig,
    SampleSearch,
    Search,
    apply_repetition_penalty,
    make_search,
    process,
    sample_rows,
    softmax,
    top_k_filter,
    top_p_filter,
)

EOS = 0


def drive(search: Search, scores: Callable[[list[int]], np.ndarray]) -> list[list[int]]:
    """Run a search against a toy model: `scores(generated)` gives next-token logits."""
    rows: list[list[int]] = [[]]
    while not search.done:
        logits = np.stack([scores(r) for r in rows])
        step = search.step(logits)
        rows = [rows[p] + [int(t)] for p, t in zip(step.parents, step.tokens, strict=True)]
        assert len(rows) == search.rows or search.done
    return search.results()


def log_table(table: dict[tuple[int, ...], dict[int, float]], vocab: int) -> Callable:
    """A toy model from a table of next-token probabilities per prefix (rest: tiny)."""

    def scores(prefix: list[int]) -> np.ndarray:
        probs = np.full(vocab, 1e-6)
        for token, p in table.get(tuple(prefix), {}).items():
            probs[token] = p
        return np.log(probs / probs.sum())

    return scores


# ---- processors ------------------------------------------------------------------------------


def test_top_k_keeps_the_k_best_and_ties() -> None:
    scores = np.array([[1.0, 5.0, 3.0, 3.0, -2.0]])
    assert np.isfinite(top_k_filter(scores, 2)).tolist() == [[False, True, True, True, False]]
    assert np.isfinite(top_k_filter(scores, 1)).sum() == 1
    assert np.array_equal(top_k_filter(scores, 0), scores)  # 0: every token


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = np.array([[0.5, 0.3, 0.15, 0.05]])
    kept = np.isfinite(top_p_filter(np.log(probs), 0.7)).tolist()
    assert kept == [[True, True, False, False]]  # 0.5 < 0.7, then 0.3 crosses it
    assert np.isfinite(top_p_filter(np.log(probs), 0.1)).tolist() == [[True, False, False, False]]
    assert np.array_equal(top_p_filter(np.log(probs), 1.0), np.log(probs))


def test_repetition_penalty_divides_positive_and_multiplies_negative_scores() -> None:
    scores = np.array([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(scores, [np.array([0, 1, 1])], 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]
    assert apply_repetition_penalty(scores, [np.array([0])], 1.0) is scores


def test_min_length_suppresses_eos_until_reached() -> None:
    cfg = DecodingConfig(max_new_tokens=5, min_new_tokens=2, eos_token_ids=(EOS,))
    scores = np.zeros((1, 4))
    assert process(scores, [np.array([1])], 1, cfg)[0, EOS] == -np.inf
    assert process(scores, [np.array([1])], 2, cfg)[0, EOS] == 0.0


def test_processors_match_transformers() -> None:
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 50)).astype(np.float32) * 3
    history = rng.integers(0, 50, size=(3, 7))
    ids, t = torch.tensor(history), torch.tensor(scores)
    cases = [
        (
            apply_repetition_penalty(scores, list(history), 1.3),
            RepetitionPenaltyLogitsProcessor(1.3),
        ),
        (top_k_filter(scores, 5), TopKLogitsWarper(5)),
        (top_p_filter(scores, 0.8), TopPLogitsWarper(0.8)),
        (scores / 0.7, TemperatureLogitsWarper(0.7)),
    ]
    for ours, theirs in cases:
        np.testing.assert_allclose(ours, theirs(ids, t.clone()).numpy(), rtol=1e-6)


# ---- sampling --------------------------------------------------------------------------------


def test_sampling_is_reproducible_per_seed_and_respects_filters() -> None:
    scores = top_k_filter(np.log(np.array([[0.4, 0.3, 0.2, 0.1]] * 200)), 2)
    a = sample_rows(scores, np.random.default_rng(7))
    b = sample_rows(scores, np.random.default_rng(7))
    assert np.array_equal(a, b)
    assert set(a.tolist()) == {0, 1}  # filtered tokens never drawn, both kept ones are
    share = (a == 0).mean()
    assert 0.45 < share < 0.7  # 0.4 / (0.4 + 0.3) = 0.57


def test_sampled_generations_follow_the_seed() -> None:
    vocab = 20

    def scores(prefix: list[int]) -> np.ndarray:
        return np.zeros(vocab)  # uniform: every sequence is as likely

    cfg = DecodingConfig(max_new_tokens=6, do_sample=True, seed=3, num_return_sequences=3)
    first = drive(SampleSearch([5], cfg), scores)
    assert first == drive(SampleSearch([5], cfg), scores)
    assert len(first) == 3 and len({tuple(s) for s in first}) == 3
    other = DecodingConfig(max_new_tokens=6, do_sample=True, seed=4, num_return_sequences=3)
    assert drive(SampleSearch([5], other), scores) != first


# ---- greedy ----------------------------------------------------------------------------------


def test_greedy_follows_the_best_token_and_stops_at_eos() -> None:
    table = {(): {3: 0.6, 1: 0.4}, (3,): {2: 0.9}, (3, 2): {EOS: 0.8, 1: 0.2}}
    cfg = DecodingConfig(max_new_tokens=10, eos_token_ids=(EOS,))
    assert drive(SampleSearch([9], cfg), log_table(table, 10)) == [[3, 2]]


def test_greedy_stops_at_max_new_tokens_and_min_length_holds_eos_back() -> None:
    table = {(): {EOS: 0.9, 4: 0.1}, (4,): {EOS: 0.9, 5: 0.1}}
    cfg = DecodingConfig(max_new_tokens=3, min_new_tokens=2, eos_token_ids=(EOS,))
    out = drive(SampleSearch([9], cfg), log_table(table, 10))
    assert out[0][:2] == [4, 5] and len(out[0]) == 2  # EOS allowed (and taken) at step 3
    capped = DecodingConfig(max_new_tokens=2, min_new_tokens=2, eos_token_ids=(EOS,))
    assert len(drive(SampleSearch([9], capped), log_table(table, 10))[0]) == 2


def test_repetition_penalty_changes_the_greedy_choice() -> None:
    def scores(prefix: list[int]) -> np.ndarray:
        s = np.zeros(6)
        s[2], s[3] = 2.0, 1.5  # 2 is always best... unless it was already said
        return s

    plain = DecodingConfig(max_new_tokens=3)
    assert drive(SampleSearch([1], plain), scores) == [[2, 2, 2]]
    penalised = DecodingConfig(max_new_tokens=3, repetition_penalty=2.0)
    # 2 (2.0 -> 1.0) yields to 3 (1.5); once both were said, 2 (1.0) beats 3 (0.75) again
    assert drive(SampleSearch([1], penalised), scores) == [[2, 3, 2]]
    assert drive(SampleSearch([2], penalised), scores)[0][0] == 3  # the prompt counts too


# ---- beam search -----------------------------------------------------------------------------


def test_beam_search_finds_what_greedy_misses() -> None:
    # Greedy takes 1 (0.6) then faces a flat distribution; 2 (0.4) leads to a sure 3.
    table = {(): {1: 0.6, 2: 0.4}, (1,): {4: 0.34, 5: 0.33, 6: 0.33}, (2,): {3: 0.95}}
    model = log_table(table, 8)
    greedy = DecodingConfig(max_new_tokens=2)
    assert drive(make_search([7], greedy), model) == [[1, 4]]
    beam = DecodingConfig(max_new_tokens=2, num_beams=2, num_return_sequences=2)
    assert drive(make_search([7], beam), model) == [[2, 3], [1, 4]]


def test_beam_search_matches_exhaustive_search_on_a_fixed_length() -> None:
    rng = np.random.default_rng(1)
    vocab, length = 5, 3
    tables = rng.normal(size=(vocab**length, vocab)) * 2

    def scores(prefix: list[int]) -> np.ndarray:
        index = sum(t * vocab**i for i, t in enumerate(prefix))
        return tables[index]

    def logp(seq: tuple[int, ...]) -> float:
        total = 0.0
        for i, token in enumerate(seq):
            s = scores(list(seq[:i]))
            total += s[token] - math.log(np.exp(s).sum())
        return total

    import itertools

    best = max(itertools.product(range(vocab), repeat=length), key=logp)
    cfg = DecodingConfig(max_new_tokens=length, num_beams=vocab**2)  # wide enough to be exact
    assert drive(BeamSearch([0], cfg), scores)[0] == list(best)


def test_length_penalty_trades_short_for_long_beams() -> None:
    # After 1: stop (EOS 0.5) or go on with a likely 2-token tail (each 0.45).
    table = {
        (): {1: 0.9, 9: 0.1},
        (1,): {EOS: 0.5, 2: 0.45},
        (1, 2): {3: 0.9, EOS: 0.1},
        (1, 2, 3): {EOS: 0.95},
    }
    model = log_table(table, 10)

    def best(penalty: float) -> list[int]:
        cfg = DecodingConfig(
            max_new_tokens=6, num_beams=2, length_penalty=penalty, eos_token_ids=(EOS,)
        )
        return drive(BeamSearch([8], cfg), model)[0]

    assert best(0.0) == [1]  # raw log-probability: the short sentence wins
    assert best(2.0) == [1, 2, 3]  # favouring length: the long one wins


def test_sampled_beams_are_reproducible() -> None:
    rng = np.random.default_rng(5)
    tables = rng.normal(size=(50, 12))

    def scores(prefix: list[int]) -> np.ndarray:
        return tables[len(prefix) * 3 + (prefix[-1] if prefix else 0) % 3]

    cfg = DecodingConfig(max_new_tokens=5, num_beams=3, do_sample=True, seed=11, top_k=6)
    assert drive(BeamSearch([1], cfg), scores) == drive(BeamSearch([1], cfg), scores)


def test_softmax_survives_minus_infinity() -> None:
    probs = softmax(np.array([[0.0, -np.inf, 0.0]]))
    assert probs.tolist() == [[0.5, 0.0, 0.5]]
