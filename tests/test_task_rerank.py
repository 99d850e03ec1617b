"""Rerank (issue #18): a tiny random-weight cross-encoder exported with --task text-ranking
(validated on (query, document) pairs), served at POST /rerank (TEI) and POST /v1/rerank
(Cohere/Jina), an embedding model reranking by cosine, every pair charged, and both routes as
batch-job endpoints."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from litestar.testing import TestClient

from appliance.models.manifest import read_manifest
from exporters.checkpoint import ExportError
from tests.conftest import build_tiny_bert
from tests.test_jobs import run

QUERY = "how do I reset my password"
DOCS = [
    "Click forgot password on the sign-in page.",
    "Our office is open Monday to Friday.",
    "Passwords must have twelve characters.",
    "The router restarts in a minute.",
]


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ce") / "tiny-ce"
    return build_tiny_bert(folder, labels=["score"], seed=5, initializer_range=0.2)


@pytest.fixture(scope="module")
def rerank_models(
    tmp_path_factory: pytest.TempPathFactory, cross_encoder: Path, models_dir: Path
) -> Path:
    from exporters.export import export_model

    out = tmp_path_factory.mktemp("rerank-models")
    export_model(cross_encoder, "text-ranking", out_dir=out, slug="tiny-rerank")
    shutil.copytree(models_dir / "tiny-embed", out / "tiny-embed")
    return out


@pytest.fixture
def client(serve: Callable[..., TestClient], rerank_models: Path) -> TestClient:
    return serve(rerank_models)


@pytest.fixture
def auth(client: TestClient) -> dict[str, str]:
    return {"x-api-key": client.keys.create("r", ["predict", "jobs"])[1]}  # type: ignore[attr-defined]


def torch_logits(folder: Path, query: str, docs: list[str]) -> np.ndarray:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    batch = tok([query] * len(docs), docs, padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        return model(**batch).logits[:, 0].double().numpy()


def test_export_validates_on_pairs_and_records_the_figures(rerank_models: Path) -> None:
    manifest = read_manifest(rerank_models / "tiny-rerank")
    assert manifest.task == "text-ranking" and manifest.labels is None
    v = manifest.validation
    assert v is not None and v.passed
    assert v.metrics["spearman"] >= v.thresholds["spearman"] == 0.9
    assert v.metrics["max_score_error"] <= v.thresholds["max_score_error"] == 0.05
    assert v.samples == 15


def test_export_refuses_a_classifier_with_several_labels(
    tmp_path: Path, checkpoints: dict[str, Path]
) -> None:
    from exporters.export import export_model

    with pytest.raises(ExportError, match="one logit"):
        export_model(checkpoints["tiny-cls"], "text-ranking", out_dir=tmp_path, slug="nope")
    assert not (tmp_path / "nope").exists()


def test_tei_rerank_sorts_by_the_sigmoid_of_pytorchs_logits(
    client: TestClient, auth: dict[str, str], cross_encoder: Path
) -> None:
    body = {"query": QUERY, "texts": DOCS, "return_text": True}
    r = client.post("/rerank", json=body, headers=auth)
    assert r.status_code == 200, r.text
    ranks = r.json()
    assert [set(x) for x in ranks] == [{"index", "score", "text"}] * len(DOCS)
    assert [x["score"] for x in ranks] == sorted((x["score"] for x in ranks), reverse=True)
    expected = 1 / (1 + np.exp(-torch_logits(cross_encoder, QUERY, DOCS)))
    for x in ranks:
        assert x["text"] == DOCS[x["index"]]
        assert abs(x["score"] - expected[x["index"]]) < 0.05
    assert [x["index"] for x in ranks] == list(np.argsort(-expected))
    assert r.headers["x-model"] == "tiny-rerank"  # the default: the first cross-encoder
    raw = client.post("/rerank", json={**body, "raw_scores": True}, headers=auth).json()
    logits = torch_logits(cross_encoder, QUERY, DOCS)
    for x in raw:  # INT8: within 5% of PyTorch's logit
        assert "text" in x and abs(x["score"] - logits[x["index"]]) < 0.05 * abs(logits).max()


def test_cohere_rerank_shape_top_n_documents_and_usage(
    client: TestClient, auth: dict[str, str]
) -> None:
    documents = [DOCS[0], {"text": DOCS[1]}, DOCS[2], {"text": DOCS[3]}]
    body = {"model": "tiny-rerank", "query": QUERY, "documents": documents, "top_n": 2}
    r = client.post("/v1/rerank", json={**body, "return_documents": True}, headers=auth)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == "tiny-rerank" and len(out["results"]) == 2
    first, second = out["results"]
    assert first["relevance_score"] >= second["relevance_score"]
    assert first["document"] == {"text": DOCS[first["index"]]}
    assert out["usage"]["total_tokens"] == int(r.headers["x-tokens-used"]) > 0
    plain = client.post("/v1/rerank", json=body, headers=auth).json()
    assert "document" not in plain["results"][0]
    # Every (query, document) pair is charged: twice the documents, about twice the tokens.
    double = {**body, "documents": documents * 2, "top_n": None}
    more = client.post("/v1/rerank", json=double, headers={**auth, "Cache-Control": "no-store"})
    assert more.json()["usage"]["total_tokens"] == 2 * out["usage"]["total_tokens"]
    assert len(more.json()["results"]) == 8


def test_an_embedding_model_reranks_by_cosine(client: TestClient, auth: dict[str, str]) -> None:
    r = client.post(
        "/v1/rerank", json={"model": "tiny-embed", "query": QUERY, "documents": DOCS}, headers=auth
    )
    assert r.status_code == 200, r.text
    vectors = []
    for text in [QUERY, *DOCS]:
        v = client.post(
            "/v1/text-vectorisation", json={"text": text, "model": "tiny-embed"}, headers=auth
        ).json()["vector"]
        vectors.append(np.array(v) / np.linalg.norm(v))
    cosines = [float(vectors[0] @ v) for v in vectors[1:]]
    for x in r.json()["results"]:
        assert abs(x["relevance_score"] - cosines[x["index"]]) < 1e-3


def test_long_pairs_are_truncated_or_refused(client: TestClient, auth: dict[str, str]) -> None:
    long_text = "password reset " * 200  # far over the tiny model's 64 tokens
    body = {"query": QUERY, "texts": [long_text, DOCS[1]]}
    cut = client.post("/rerank", json=body, headers=auth)
    assert cut.status_code == 200 and cut.headers["x-truncated"] == "true"
    refused = client.post("/rerank", json={**body, "truncate": False}, headers=auth)
    assert refused.status_code == 422 and refused.json()["code"] == "INPUT_TOO_LONG"
    for bad in ({"query": "", "texts": DOCS}, {"query": QUERY, "texts": []}, {"texts": DOCS}):
        r = client.post("/rerank", json=bad, headers=auth)
        assert r.status_code in (400, 422) and r.json()["code"], (bad, r.text)
    wrong = client.post(
        "/v1/rerank", json={"model": "nope", "query": QUERY, "documents": DOCS}, headers=auth
    )
    assert wrong.status_code == 404


def test_both_routes_run_as_batch_jobs(client: TestClient, auth: dict[str, str]) -> None:
    key = auth["x-api-key"]
    lines = [{"query": QUERY, "documents": DOCS[:2]}, {"query": "x", "documents": []}]
    body = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    job, rows = run(client, key, body, "/v1/rerank", model="tiny-rerank")
    assert job["status"] == "completed", job
    assert rows[0]["status"] == 200 and len(rows[0]["response"]["results"]) == 2
    assert rows[1]["status"] in (400, 422)
    job, rows = run(client, key, b'{"query": "q", "texts": ["a", "b"]}\n', "/rerank")
    assert rows[0]["status"] == 200 and {x["index"] for x in rows[0]["response"]} == {0, 1}


def test_more_documents_than_a_batch_may_hold_are_a_422_in_real_time_and_in_a_job(
    client: TestClient, auth: dict[str, str]
) -> None:
    """server.max_batch_items, as on every batch route; a 503 would tell a job to retry
    forever what can never fit."""
    many = [f"document {i}" for i in range(1001)]
    for path, body in (
        ("/rerank", {"query": QUERY, "texts": many}),
        ("/v1/rerank", {"query": QUERY, "documents": many, "model": "tiny-rerank"}),
    ):
        r = client.post(path, json=body, headers=auth)
        assert r.status_code == 422 and r.json()["details"]["max_items"] == 1000, r.text
    line = json.dumps({"query": QUERY, "documents": many}).encode() + b"\n"
    nested = b'{"query": "q", "documents": ' + b"[" * 10_000 + b"\n"
    job, rows = run(client, auth["x-api-key"], line + nested, "/v1/rerank", model="tiny-rerank")
    assert job["status"] == "completed", job
    assert [row["status"] for row in rows] == [422, 400]
    assert rows[1]["error"]["code"] == "INVALID_JSON"
