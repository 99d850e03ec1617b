"""The models API: list, details, predict — shapes of seeds/models-predict-api.txt."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from litestar.testing import TestClient

from exporters.samples import SAMPLE_TEXTS


def torch_probabilities(folder: Path, texts: list[str], multi_label: bool) -> np.ndarray:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.inference_mode():
        logits = model(**tok(texts, padding=True, truncation=True, return_tensors="pt")).logits
    return (torch.sigmoid(logits) if multi_label else torch.softmax(logits, -1)).numpy()


@pytest.mark.parametrize("prefix", ["/api/v1", "/v1"])
def test_list_models(client: TestClient, predict_key: str, prefix: str) -> None:
    r = client.get(f"{prefix}/models", headers={"x-api-key": predict_key})
    assert r.status_code == 200
    data = {m["slug"]: m for m in r.json()["data"]}
    assert set(data) == {"tiny-embed", "tiny-cls", "tiny-tags"}
    cls = data["tiny-cls"]
    assert cls == {
        "code": "TINY_CLS",
        "name": cls["name"],
        "slug": "tiny-cls",
        "task": "text-classification",
        "call_url": "/api/v1/models/tiny-cls/predict",
        "is_active": True,
        "build_status": "success",
        "description": "",
        "tasks": ["text-classification", "classify", "tag", "emotion"],
        "id": "tiny-cls",
        "object": "model",
        "created": cls["created"],
        "owned_by": "appliance",
    }
    assert r.json()["object"] == "list"


def test_model_details(client: TestClient, predict_key: str) -> None:
    r = client.get("/api/v1/models/tiny-cls", headers={"x-api-key": predict_key})
    assert r.status_code == 200
    data = r.json()["data"]
    assert data["labels"] == ["ham", "spam"]
    assert data["example_payload"] == {"text": "Offre gratuite, cliquez ici"}
    assert data["max_tokens"] == 64
    assert data["quantization"]["method"] == "dynamic-int8"
    assert data["size_bytes"] > 0
    assert data["validation"]["passed"] is True
    assert data["validation"]["metrics"]["argmax_agreement"] >= 0.9


def test_unknown_model_details_is_404(client: TestClient, predict_key: str) -> None:
    r = client.get("/api/v1/models/nope", headers={"x-api-key": predict_key})
    assert r.status_code == 404
    assert r.json()["code"] == "MODEL_NOT_FOUND"


@pytest.mark.parametrize("slug,multi", [("tiny-cls", False), ("tiny-tags", True)])
def test_predict_classification_agrees_with_pytorch(
    client: TestClient, predict_key: str, checkpoints: dict[str, Path], slug: str, multi: bool
) -> None:
    texts = SAMPLE_TEXTS[:6]
    ref = torch_probabilities(checkpoints[slug], texts, multi)
    for text, expected in zip(texts, ref, strict=True):
        r = client.post(
            f"/api/v1/models/{slug}/predict",
            json={"input": {"text": text}},
            headers={"Authorization": f"Bearer {predict_key}", "X-Request-ID": "req-123"},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["request_id"] == "req-123" == r.headers["x-request-id"]
        assert body["model"]["code"] == slug.upper().replace("-", "_")
        assert body["meta"]["status"] == 200
        assert body["meta"]["tokens"] > 0
        assert body["meta"]["cached"] is False
        out = body["output"]
        probs = np.array(list(out["probabilities"].values()))
        assert np.abs(probs - expected).max() < 0.05
        labels = list(out["probabilities"])
        assert out["label"] == labels[int(np.argmax(expected))]
        assert out["score"] == pytest.approx(max(probs))
        if not multi:
            assert probs.sum() == pytest.approx(1.0, abs=1e-6)


def test_predict_embedding_gives_vector(client: TestClient, predict_key: str) -> None:
    r = client.post(
        "/v1/models/tiny-embed/predict",
        json={"input": {"text": "hello"}},
        headers={"x-api-key": predict_key},
    )
    assert r.status_code == 200
    assert len(r.json()["output"]["vector"]) == 32


@pytest.mark.parametrize(
    "body",
    [{"input": [{"text": "a"}, {"text": "b"}]}, {"input": {"text": ["a", "b"]}}],
    ids=["list-of-inputs", "list-of-texts"],
)
def test_predict_refuses_batches(client: TestClient, predict_key: str, body: dict) -> None:
    r = client.post(
        "/api/v1/models/tiny-cls/predict", json=body, headers={"x-api-key": predict_key}
    )
    assert r.status_code == 422
    assert r.json()["code"] == "BATCH_NOT_SUPPORTED"


def test_task_api_model_routes(serve, models_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    models = tmp_path / "models"
    shutil.copytree(models_dir, models)
    client = serve(models)
    predict = {"x-api-key": client.keys.create("p", ["predict"])[1]}
    admin = {"x-api-key": client.keys.create("a", ["admin"])[1]}
    listed = client.get("/models", headers=predict).json()
    assert {m["id"] for m in listed} == {"model_tiny-embed", "model_tiny-cls", "model_tiny-tags"}
    entry = next(m for m in listed if m["name"] == "tiny-embed")
    assert set(entry) == {"id", "name", "description", "tasks", "build_status", "last_deployment"}
    assert "text-vectorisation" in entry["tasks"] and entry["build_status"] == "success"
    detail = client.get("/models/tiny-embed?include_global=true", headers=predict).json()
    assert {"build_message", "model_url", "config_url", "requirements_url"} <= set(detail)
    assert client.get("/models/nope", headers=predict).status_code == 404

    assert client.delete("/models/tiny-embed", headers=predict).status_code == 403
    r = client.delete("/models/tiny-embed", headers=admin)
    assert r.status_code == 200 and r.json() is None
    assert not (models / "tiny-embed").exists()
    assert client.get("/models/tiny-embed", headers=predict).status_code == 404
    gone = client.post(
        "/v1/text-vectorisation", json={"text": "x", "model": "tiny-embed"}, headers=predict
    )
    assert gone.status_code == 404
    assert client.delete("/v1/models/tiny-cls", headers=admin).json() == {
        "slug": "tiny-cls",
        "deleted": True,
    }
    assert client.delete("/v1/models/tiny-cls", headers=admin).status_code == 404
    # The others still serve.
    ok = client.post(
        "/api/v1/models/tiny-tags/predict", json={"input": {"text": "x"}}, headers=predict
    )
    assert ok.status_code == 200


def test_model_lists_and_details_follow_the_keys_allowlist(client: TestClient) -> None:
    key = client.keys.create("k", ["predict"], models=["tiny-embed"])[1]  # type: ignore[attr-defined]
    headers = {"x-api-key": key}
    for path in ("/v1/models", "/api/v1/models"):
        assert [m["slug"] for m in client.get(path, headers=headers).json()["data"]] == [
            "tiny-embed"
        ]
    assert [m["name"] for m in client.get("/models", headers=headers).json()] == ["tiny-embed"]
    assert client.get("/api/v1/models/tiny-embed", headers=headers).status_code == 200
    for path in ("/api/v1/models/tiny-cls", "/v1/models/tiny-cls", "/models/tiny-cls"):
        r = client.get(path, headers=headers)
        assert r.status_code == 404 and r.json()["code"] == "MODEL_NOT_FOUND", path
