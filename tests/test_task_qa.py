"""Extractive QA: span selection logic, and a tiny exported model against transformers'
question-answering pipeline (same spans, same "unknown")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.tasks.qa import best_answer, fold_history


def window(start: list[float], end: list[float], context: list[bool]) -> tuple:
    return np.array(start), np.array(end), np.array(context)


def test_best_span_respects_order_and_context() -> None:
    ctx = [False, False, True, True, True, False]
    # The highest start is after the highest end: the best valid span is start 2 .. end 3.
    w = window([0, 0, 5, 1, 9, 0], [0, 0, 1, 6, 0, 9], ctx)
    score, win, i, j, _ = best_answer([w], max_answer_tokens=15)
    assert (win, i, j) == (0, 2, 3)
    assert 0 < score < 1


def test_max_answer_length_limits_spans() -> None:
    ctx = [False] + [True] * 6
    w = window([0, 9, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 9], ctx)
    _, _, i, j, _ = best_answer([w], max_answer_tokens=3)
    assert j - i <= 2


def test_the_best_window_wins() -> None:
    ctx = [False, True, True, True]
    weak = window([0, 1, 0, 0], [0, 0, 1, 0], ctx)
    strong = window([0, 0, 8, 0], [0, 0, 0, 8], ctx)
    _, win, i, j, _ = best_answer([weak, strong], max_answer_tokens=15)
    assert (win, i, j) == (1, 2, 3)


def test_null_score_is_the_lowest_over_windows() -> None:
    ctx = [False, True, True]
    confident_null = window([9, 0, 0], [9, 0, 0], ctx)
    doubtful_null = window([1, 0, 0], [1, 0, 0], ctx)
    *_, null_a = best_answer([confident_null], 15)
    *_, null_both = best_answer([confident_null, doubtful_null], 15)
    assert null_both < null_a


def test_history_is_folded_into_the_question() -> None:
    assert fold_history("And now?", ["What is it?"], ["unknown"]) == "What is it? unknown And now?"
    assert fold_history("Q?", [], []) == "Q?"


QUESTIONS = [
    ("What is the meaning of life?", "The meaning of life is 42."),
    ("Where does the queen live?", "The queen lives in a large palace in London with her dogs."),
    (
        "When was the match?",
        "It rained all day, so the football match was postponed until Sunday. " * 6,
    ),
    (
        "Who sells shells?",
        "She sells sea shells by the sea shore; the shells she sells are surely sea shells.",
    ),
]


def pipeline_answers(src: Path, manifest_config: dict, max_tokens: int) -> list[str]:
    from transformers import pipeline

    qa = pipeline("question-answering", model=str(src), tokenizer=str(src), device="cpu")
    answers = []
    for q, c in QUESTIONS:
        out = qa(
            question=q,
            context=c,
            max_seq_len=max_tokens,
            doc_stride=manifest_config["doc_stride"],
            max_answer_len=manifest_config["max_answer_tokens"],
            handle_impossible_answer=True,
        )
        answers.append(out["answer"] or "unknown")
    return answers


def test_served_answers_match_the_transformers_pipeline(serve, qa_model) -> None:  # type: ignore[no-untyped-def]
    from appliance.models.manifest import read_manifest

    src, models = qa_model
    manifest = read_manifest(models / "tiny-qa")
    assert manifest.validation is not None and manifest.validation.passed
    expected = pipeline_answers(src, manifest.config, manifest.max_tokens)
    client = serve(models)
    key = client.keys.create("k", ["predict"])[1]
    for path in ("/qa", "/v1/qa"):
        r = client.post(
            path,
            json={
                "question": [q for q, _ in QUESTIONS],
                "context": [c for _, c in QUESTIONS],
                "model": "tiny-qa",
            },
            headers={"x-api-key": key},
        )
        assert r.status_code == 200, r.text
        assert r.json()["answer"] == expected
    single = client.post(
        "/qa",
        json={
            "question": QUESTIONS[0][0],
            "context": QUESTIONS[0][1],
            "prev_q": [],
            "prev_a": [],
            "model": "tiny-qa",
        },
        headers={"x-api-key": key},
    )
    assert single.json() == {"answer": expected[0]}
    predict = client.post(
        "/api/v1/models/tiny-qa/predict",
        json={"input": {"question": QUESTIONS[1][0], "context": QUESTIONS[1][1]}},
        headers={"x-api-key": key},
    )
    assert predict.json()["output"]["answer"] == expected[1]
    assert 0 <= predict.json()["output"]["score"] <= 1


def test_the_seed_example_with_history(serve, qa_model) -> None:  # type: ignore[no-untyped-def]
    client = serve(qa_model[1], APPLIANCE_ENDPOINT_ALIASES__QA='{"english": "tiny-qa"}')
    key = client.keys.create("k", ["predict"])[1]
    body = {
        "question": "What is the meaning of life?",
        "context": "The meaning of life is 42.",
        "prev_q": ["What is not the meaning of life?"],
        "prev_a": ["unknown"],
        "model": "english",
    }
    r = client.post("/qa", json=body, headers={"x-api-key": key})
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["answer"], str) and r.json()["answer"]


@pytest.mark.parametrize(
    "body",
    [
        {"question": "", "context": "c"},
        {"question": "q", "context": ""},
        {"question": "q", "context": "c", "prev_q": ["a"], "prev_a": []},
        {"question": "q", "context": "c", "prev_q": [1], "prev_a": ["x"]},
        {"question": ["q1", "q2"], "context": ["only one"]},
        {"question": "q", "context": "x" * 200_001},
        {"question": "q"},
    ],
)
def test_bad_qa_requests_are_422(serve, qa_model, body: dict) -> None:  # type: ignore[no-untyped-def]
    client = serve(qa_model[1])
    key = client.keys.create("k", ["predict"])[1]
    r = client.post("/qa", json={**body, "model": "tiny-qa"}, headers={"x-api-key": key})
    assert r.status_code == 422, r.text


def test_a_question_longer_than_the_model_is_422(serve, qa_model) -> None:  # type: ignore[no-untyped-def]
    client = serve(qa_model[1])
    key = client.keys.create("k", ["predict"])[1]
    r = client.post(
        "/qa",
        json={"question": "word " * 200, "context": "short", "model": "tiny-qa"},
        headers={"x-api-key": key},
    )
    assert r.status_code == 422
