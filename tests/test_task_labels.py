"""Classification over given labels: zero-shot by embedding similarity and by NLI entailment,
label subsets on fine-tuned classifiers, emotion; via the task API and the models API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from litestar.testing import TestClient

from appliance.api.tasks import GO_EMOTIONS
from appliance.tasks.embed import DEFAULT_BIAS, DEFAULT_TEMPERATURE
from tests.conftest import build_tiny_bert
from tests.test_api_text_vectorisation import torch_embeddings

TEXT = "I am really mad because my product broke."
LABELS = ["product issue", "furniture", "space"]


@pytest.fixture(scope="module")
def label_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    from exporters.export import export_model

    src = tmp_path_factory.mktemp("label-checkpoints")
    out = tmp_path_factory.mktemp("label-models")
    checkpoints = {
        "tiny-embed": build_tiny_bert(src / "tiny-embed"),
        "tiny-nli": build_tiny_bert(
            src / "tiny-nli", labels=["entailment", "neutral", "contradiction"], seed=3
        ),
        "tiny-emotions": build_tiny_bert(
            src / "tiny-emotions", labels=list(GO_EMOTIONS), multi_label=True, seed=4
        ),
    }
    export_model(checkpoints["tiny-embed"], "feature-extraction", out_dir=out, slug="tiny-embed")
    export_model(checkpoints["tiny-nli"], "zero-shot-classification", out_dir=out, slug="tiny-nli")
    export_model(
        checkpoints["tiny-emotions"], "text-classification", out_dir=out, slug="tiny-emotions"
    )
    return out, checkpoints


@pytest.fixture
def labels_client(serve, label_models) -> tuple[TestClient, str]:  # type: ignore[no-untyped-def]
    client = serve(label_models[0])
    return client, client.keys.create("k", ["predict"])[1]


def similarity_reference(folder: Path, text: str, labels: list[str], multi: bool) -> np.ndarray:
    vectors = torch_embeddings(folder, [text, *labels]).astype(np.float64)
    cosine = vectors[1:] @ vectors[0]
    if multi:
        return 1 / (1 + np.exp(-(cosine - DEFAULT_BIAS) / DEFAULT_TEMPERATURE))
    z = np.exp((cosine - cosine.max()) / DEFAULT_TEMPERATURE)
    return z / z.sum()


def nli_reference(folder: Path, text: str, labels: list[str], multi: bool) -> dict[str, float]:
    from transformers import pipeline

    classify = pipeline(
        "zero-shot-classification", model=str(folder), tokenizer=str(folder), device="cpu"
    )
    out = classify(text, candidate_labels=labels, multi_label=multi)
    return dict(zip(out["labels"], out["scores"], strict=True))


@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("path", ["/v1/text-classification", "/text-classification"])
def test_zero_shot_by_similarity_matches_pytorch(
    labels_client, label_models, path: str, multi: bool
) -> None:  # type: ignore[no-untyped-def]
    client, key = labels_client
    body = {"text": TEXT, "labels": LABELS, "model": "tiny-embed", "multi_label": multi}
    r = client.post(path, json=body, headers={"x-api-key": key})
    assert r.status_code == 200, r.text
    probs = r.json()["probabilities"]
    assert list(probs) == LABELS
    expected = similarity_reference(label_models[1]["tiny-embed"], TEXT, LABELS, multi)
    assert np.abs(np.array(list(probs.values())) - expected).max() < 0.03
    if not multi:
        assert sum(probs.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("multi", [False, True])
def test_zero_shot_by_nli_matches_the_transformers_pipeline(
    labels_client, label_models, multi: bool
) -> None:  # type: ignore[no-untyped-def]
    client, key = labels_client
    r = client.post(
        "/v1/text-classification",
        json={"text": TEXT, "labels": LABELS, "model": "tiny-nli", "multi_label": multi},
        headers={"x-api-key": key},
    )
    assert r.status_code == 200, r.text
    served = r.json()["probabilities"]
    expected = nli_reference(label_models[1]["tiny-nli"], TEXT, LABELS, multi)
    for label in LABELS:
        assert served[label] == pytest.approx(expected[label], abs=0.03)
    assert max(served, key=served.get) == max(expected, key=expected.get)


def test_batch_with_a_label_list_per_text(labels_client) -> None:  # type: ignore[no-untyped-def]
    client, key = labels_client
    texts = [TEXT, "I would like to collaborate with you on social media"]
    labels = [LABELS, ["product issue", "furniture", "sales"]]
    r = client.post(
        "/text-classification",
        json={"text": texts, "labels": labels, "model": "tiny-nli"},
        headers={"x-api-key": key},
    )
    assert r.status_code == 200, r.text
    out = r.json()["probabilities"]
    assert [list(p) for p in out] == labels
    single = client.post(
        "/text-classification",
        json={"text": texts[1], "labels": labels[1], "model": "tiny-nli"},
        headers={"x-api-key": key, "Cache-Control": "no-cache"},
    ).json()["probabilities"]
    assert out[1] == pytest.approx(single)


def test_one_label_list_for_a_whole_batch(labels_client) -> None:  # type: ignore[no-untyped-def]
    client, key = labels_client
    r = client.post(
        "/v1/text-classification",
        json={"text": ["a", "b", "c"], "labels": LABELS, "model": "tiny-embed"},
        headers={"x-api-key": key},
    )
    assert r.status_code == 200 and len(r.json()["probabilities"]) == 3


def test_models_api_predict_on_an_nli_model(labels_client) -> None:  # type: ignore[no-untyped-def]
    client, key = labels_client
    r = client.post(
        "/api/v1/models/tiny-nli/predict",
        json={"input": {"text": TEXT, "labels": LABELS}},
        headers={"x-api-key": key},
    )
    assert r.status_code == 200, r.text
    out = r.json()["output"]
    assert out["label"] in LABELS and out["score"] == max(out["probabilities"].values())


def test_fine_tuned_classifier_takes_a_subset_of_its_labels(labels_client) -> None:  # type: ignore[no-untyped-def]
    client, key = labels_client
    headers = {"x-api-key": key}
    full = client.post(
        "/api/v1/models/tiny-emotions/predict", json={"input": {"text": TEXT}}, headers=headers
    )
    assert set(full.json()["output"]["probabilities"]) == set(GO_EMOTIONS)
    sub = client.post(
        "/v1/text-classification",
        json={"text": TEXT, "labels": ["joy", "anger"], "model": "tiny-emotions"},
        headers=headers,
    ).json()["probabilities"]
    assert sub == pytest.approx(
        {k: full.json()["output"]["probabilities"][k] for k in ("joy", "anger")}
    )
    bad = client.post(
        "/v1/text-classification",
        json={"text": TEXT, "labels": ["spaceship"], "model": "tiny-emotions"},
        headers=headers,
    )
    assert bad.status_code == 422 and "spaceship" in bad.json()["message"]


@pytest.mark.parametrize("model", ["tiny-emotions", "tiny-embed", "tiny-nli"])
def test_emotion_returns_go_emotions_labels(labels_client, model: str) -> None:  # type: ignore[no-untyped-def]
    client, key = labels_client
    r = client.post(
        "/emotion", json={"text": "I hope this works", "model": model}, headers={"x-api-key": key}
    )
    assert r.status_code == 200, r.text
    output = r.json()["output"]
    assert output and set(output.split(",")) <= set(GO_EMOTIONS)
    batch = client.post(
        "/v1/emotion",
        json={
            "text": ["I hope this works", "I'll be most upset if things go wrong"],
            "model": model,
        },
        headers={"x-api-key": key},
    ).json()["output"]
    assert len(batch) == 2 and batch[0] == output


def test_emotion_threshold_controls_how_many(labels_client) -> None:  # type: ignore[no-untyped-def]
    client, key = labels_client
    body = {"text": "I hope this works", "model": "tiny-emotions"}
    everything = client.post(
        "/emotion", json={**body, "threshold": 0.0}, headers={"x-api-key": key}
    ).json()
    nothing = client.post(
        "/emotion", json={**body, "threshold": 1.0}, headers={"x-api-key": key}
    ).json()
    assert len(everything["output"].split(",")) == 28
    assert len(nothing["output"].split(",")) == 1  # none passes: the top label alone


@pytest.mark.parametrize(
    "body",
    [
        {"text": TEXT, "labels": [], "model": "tiny-embed"},
        {"text": TEXT, "labels": ["a", "a"], "model": "tiny-embed"},
        {"text": TEXT, "labels": ["a", ""], "model": "tiny-embed"},
        {"text": TEXT, "labels": ["a", 3], "model": "tiny-embed"},
        {"text": "", "labels": ["a"], "model": "tiny-nli"},
        {"text": ["a", "b"], "labels": [["x"], ["y"], ["z"]], "model": "tiny-nli"},
        {"text": TEXT, "labels": ["a"], "model": "tiny-embed", "multi_label": "yes"},
    ],
)
def test_bad_label_requests_are_422(labels_client, body: dict) -> None:  # type: ignore[no-untyped-def]
    client, key = labels_client
    r = client.post("/v1/text-classification", json=body, headers={"x-api-key": key})
    assert r.status_code == 422, r.text


def test_emotion_threshold_out_of_range_is_422(labels_client) -> None:  # type: ignore[no-untyped-def]
    client, key = labels_client
    r = client.post(
        "/emotion",
        json={"text": "x", "model": "tiny-embed", "threshold": 2},
        headers={"x-api-key": key},
    )
    assert r.status_code == 422


def test_nli_export_needs_nli_labels(tmp_path: Path, label_models) -> None:  # type: ignore[no-untyped-def]
    from exporters.checkpoint import ExportError
    from exporters.export import export_model

    with pytest.raises(ExportError, match="not an NLI model"):
        export_model(
            label_models[1]["tiny-emotions"], "zero-shot-classification", out_dir=tmp_path, slug="x"
        )
