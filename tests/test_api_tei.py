"""Hugging Face TEI's routes (issue #18): POST /embed, /predict, /tokenize and GET /info in
TEI's shapes, the [defaults] models, the appliance's auth, limits, cache and headers, batch
jobs, and the real `huggingface_hub` InferenceClient against /embed."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from litestar.testing import TestClient
from tokenizers import Tokenizer

import appliance
from appliance.models.manifest import read_manifest
from tests.test_jobs import LiveServer, run

TEXTS = ["the invoice is wrong", "click here to win free money"]


def key(client: TestClient, scopes: list[str] | None = None, **limits: object) -> dict[str, str]:
    secret = client.keys.create("tei", scopes or ["predict"], **limits)[1]  # type: ignore[attr-defined]
    return {"x-api-key": secret}


@pytest.fixture
def auth(client: TestClient) -> dict[str, str]:
    return key(client)


def vectorise(client: TestClient, auth: dict[str, str], texts: list[str]) -> np.ndarray:
    r = client.post(
        "/v1/text-vectorisation", json={"text": texts, "model": "tiny-embed"}, headers=auth
    )
    assert r.status_code == 200, r.text
    return np.array(r.json()["vector"])


# ---- /embed ------------------------------------------------------------------------------
def test_embed_single_and_batch_give_a_list_of_vectors(
    client: TestClient, auth: dict[str, str]
) -> None:
    native = vectorise(client, auth, TEXTS)
    r = client.post("/embed", json={"inputs": TEXTS}, headers=auth)
    assert r.status_code == 200, r.text
    assert r.headers["x-model"] == "tiny-embed"  # the only embedding model: the default
    out = np.array(r.json())
    assert out.shape == native.shape and np.allclose(out, native, atol=1e-6)
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    single = client.post("/embed", json={"inputs": TEXTS[0]}, headers=auth).json()
    assert len(single) == 1 and np.allclose(single[0], native[0], atol=1e-6)


def test_embed_headers_cache_and_tokens(client: TestClient, auth: dict[str, str]) -> None:
    body = {"inputs": "a text for the cache", "model": "tiny-embed"}
    first = client.post("/embed", json=body, headers=auth)
    again = client.post("/embed", json=body, headers=auth)
    assert first.headers["x-cache"] == "MISS" and again.headers["x-cache"] == "HIT"
    assert int(first.headers["x-tokens-used"]) > 0 and again.headers["x-tokens-used"] == "0"
    assert first.headers["x-cache-key"] == again.headers["x-cache-key"]
    assert "x-cache-age" in again.headers and "x-request-id" in again.headers
    for name in ("limit-requests", "remaining-requests", "limit-tokens", "remaining-tokens"):
        assert f"x-ratelimit-{name}" in first.headers
    bypass = client.post("/embed", json=body, headers={**auth, "Cache-Control": "no-store"})
    assert bypass.headers["x-cache"] == "BYPASS" and int(bypass.headers["x-tokens-used"]) > 0
    assert first.json() == again.json() == bypass.json()


def test_embed_dimensions_cut_and_renormalise(
    client: TestClient, auth: dict[str, str], models_dir: Path
) -> None:
    full = np.array(client.post("/embed", json={"inputs": TEXTS[0]}, headers=auth).json()[0])
    cut = client.post("/embed", json={"inputs": TEXTS[0], "dimensions": 8}, headers=auth)
    assert cut.status_code == 200
    v = np.array(cut.json()[0])
    assert v.shape == (8,) and np.isclose(np.linalg.norm(v), 1, atol=1e-5)
    assert np.allclose(v, full[:8] / np.linalg.norm(full[:8]), atol=1e-5)
    pooled = client.post("/embed", json={"inputs": TEXTS[0], "normalize": False}, headers=auth)
    plain = client.post(
        "/embed", json={"inputs": TEXTS[0], "dimensions": 8, "normalize": False}, headers=auth
    ).json()[0]
    assert np.allclose(plain, pooled.json()[0][:8], atol=1e-6)  # cut, not renormalised
    dim = read_manifest(models_dir / "tiny-embed").dimension
    assert dim is not None
    spent = client.get("/v1/balance", headers=auth).json()["spent"]
    assert spent > 0  # the requests above were charged
    over = client.post("/embed", json={"inputs": "x", "dimensions": dim + 1}, headers=auth)
    assert over.status_code == 422 and over.json()["details"] == {"field": "dimensions", "max": dim}
    assert client.get("/v1/balance", headers=auth).json()["spent"] == spent  # refused up front
    at = client.post("/embed", json={"inputs": "x", "dimensions": dim}, headers=auth)
    assert at.status_code == 200 and len(at.json()[0]) == dim


def test_normalize_false_gives_the_pooled_vectors(
    client: TestClient, auth: dict[str, str], models_dir: Path
) -> None:
    assert read_manifest(models_dir / "tiny-embed").normalize  # exported normalised
    unit = np.array(client.post("/embed", json={"inputs": TEXTS}, headers=auth).json())
    r = client.post("/embed", json={"inputs": TEXTS, "normalize": False}, headers=auth)
    assert r.status_code == 200 and r.headers["x-cache"] == "MISS"  # not the normalised entry
    raw = np.array(r.json())
    norms = np.linalg.norm(raw, axis=1)
    assert not np.allclose(norms, 1, atol=1e-3)
    assert np.allclose(raw / norms[:, None], unit, atol=1e-5)


def test_one_model_call_with_and_without_normalisation(models_dir: Path) -> None:
    # The micro-batcher merges requests into one call: each item keeps its own choice.
    import onnxruntime as ort

    from appliance.tasks import build_runner

    folder = models_dir / "tiny-embed"
    manifest = read_manifest(folder)
    session = ort.InferenceSession(str(folder / manifest.files["model"].path))
    runner = build_runner(folder, manifest, session)
    payloads = [{"text": TEXTS[0]}, {"text": TEXTS[0], "normalize": False}, {"text": TEXTS[1]}]
    items = runner.preprocess([runner.parse_input(p) for p in payloads])
    raws = runner.infer(items)
    merged = [runner.postprocess(i, r).output["vector"] for i, r in zip(items, raws, strict=True)]
    alone = [runner.postprocess(i, runner.infer([i])[0]).output["vector"] for i in items]
    # dynamic INT8 quantises activations over the whole call: alone, values move a little
    assert np.allclose(merged, alone, atol=1e-3)
    assert np.isclose(np.linalg.norm(merged[0]), 1) and np.isclose(np.linalg.norm(merged[2]), 1)
    assert not np.isclose(np.linalg.norm(merged[1]), 1)
    assert np.allclose(np.array(merged[1]) / np.linalg.norm(merged[1]), merged[0], atol=1e-6)


def test_embed_truncate(client: TestClient, auth: dict[str, str]) -> None:
    long = " ".join(["invoice"] * 300)
    cut = client.post("/embed", json={"inputs": long}, headers=auth)
    assert cut.status_code == 200 and cut.headers["x-truncated"] == "true"
    right = client.post(
        "/embed", json={"inputs": long, "truncation_direction": "Right"}, headers=auth
    )
    assert right.json() == cut.json()
    refused = client.post("/embed", json={"inputs": long, "truncate": False}, headers=auth)
    assert refused.status_code == 422 and refused.json()["code"] == "INPUT_TOO_LONG"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"inputs": []}, 422),
        ({"inputs": "   "}, 422),
        ({"inputs": [1, 2]}, 422),
        ({"inputs": "x", "dimensions": 0}, 422),
        ({"inputs": "x", "truncation_direction": "left"}, 422),
        ({}, 422),
        ({"inputs": "x", "model": "no-such-model"}, 404),
        ({"inputs": "x", "model": "tiny-cls"}, 422),
    ],
)
def test_embed_bad_bodies(
    client: TestClient, auth: dict[str, str], body: dict[str, object], status: int
) -> None:
    r = client.post("/embed", json=body, headers=auth)
    assert r.status_code == status, r.text
    assert set(r.json()) >= {"error", "code", "message", "details", "request_id"}


def test_prompt_name_puts_the_models_prompt_first(
    serve: Callable[..., TestClient], models_dir: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    shutil.copytree(models_dir / "tiny-embed", models / "tiny-embed")
    manifest_file = models / "tiny-embed" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["config"]["prompts"] = {"query": "query: "}
    manifest_file.write_text(json.dumps(manifest))
    client = serve(models)
    auth = key(client)
    prompted = client.post("/embed", json={"inputs": "cats", "prompt_name": "query"}, headers=auth)
    assert prompted.status_code == 200, prompted.text
    spelled = client.post("/embed", json={"inputs": "query: cats"}, headers=auth)
    assert np.allclose(prompted.json(), spelled.json(), atol=1e-6)
    plain = client.post("/embed", json={"inputs": "cats"}, headers=auth)
    assert not np.allclose(prompted.json(), plain.json(), atol=1e-3)
    unknown = client.post("/embed", json={"inputs": "cats", "prompt_name": "doc"}, headers=auth)
    assert unknown.status_code == 422 and unknown.json()["details"]["prompts"] == ["query"]
    tokens = client.post("/tokenize", json={"inputs": "cats", "prompt_name": "query"}, headers=auth)
    assert (
        tokens.json()
        == client.post("/tokenize", json={"inputs": "query: cats"}, headers=auth).json()
    )


# ---- /predict ----------------------------------------------------------------------------
def test_predict_single_forms_and_batch(client: TestClient, auth: dict[str, str]) -> None:
    r = client.post("/predict", json={"inputs": TEXTS[1]}, headers=auth)
    assert r.status_code == 200, r.text
    model = r.headers["x-model"]
    assert model in ("tiny-cls", "tiny-tags")  # the first classifier installed
    preds = r.json()
    assert all(set(p) == {"label", "score"} for p in preds)
    assert [p["score"] for p in preds] == sorted((p["score"] for p in preds), reverse=True)
    native = client.post(
        f"/v1/models/{model}/predict", json={"input": {"text": TEXTS[1]}}, headers=auth
    ).json()["output"]["probabilities"]
    assert {p["label"]: p["score"] for p in preds} == pytest.approx(native, abs=1e-6)
    listed = client.post("/predict", json={"inputs": [TEXTS[1]]}, headers=auth).json()
    assert listed == preds  # ["text"] is one text, as in TEI
    batch = client.post("/predict", json={"inputs": [[t] for t in TEXTS]}, headers=auth).json()
    assert len(batch) == 2 and batch[1] == preds
    assert all(isinstance(row, list) for row in batch)


def test_predict_sorted_scores_raw_scores_and_default_from_config(
    serve: Callable[..., TestClient], models_dir: Path
) -> None:
    client = serve(models_dir, APPLIANCE_DEFAULTS__CLASSIFIER="tiny-cls")
    auth = key(client)
    r = client.post("/predict", json={"inputs": TEXTS[0]}, headers=auth)
    assert r.headers["x-model"] == "tiny-cls"
    preds = {p["label"]: p["score"] for p in r.json()}
    assert set(preds) == {"ham", "spam"} and sum(preds.values()) == pytest.approx(1)
    raw = client.post("/predict", json={"inputs": TEXTS[0], "raw_scores": True}, headers=auth)
    assert raw.status_code == 200 and raw.headers["x-cache"] == "MISS"  # its own cache entry
    logits = {p["label"]: p["score"] for p in raw.json()}
    z = np.array([logits["ham"], logits["spam"]])
    soft = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    assert soft == pytest.approx([preds["ham"], preds["spam"]], abs=1e-5)
    assert [p["score"] for p in raw.json()] == sorted(logits.values(), reverse=True)
    named = client.post("/predict", json={"inputs": "x", "model": "tiny-tags"}, headers=auth)
    assert named.headers["x-model"] == "tiny-tags"


@pytest.mark.parametrize(
    ("inputs", "status"),
    [
        (["a question", "a passage"], 422),  # TEI's sentence pair: not served here
        ([["a", "b"]], 422),
        (["a", ["b"]], 422),
        ([], 422),
        (["a", "b", "c"], 422),
    ],
)
def test_predict_refuses_what_it_cannot_take(
    client: TestClient, auth: dict[str, str], inputs: object, status: int
) -> None:
    r = client.post("/predict", json={"inputs": inputs}, headers=auth)
    assert r.status_code == status, r.text


def test_predict_with_an_embedding_model_is_a_task_mismatch(
    client: TestClient, auth: dict[str, str]
) -> None:
    r = client.post("/predict", json={"inputs": "x", "model": "tiny-embed"}, headers=auth)
    assert r.status_code == 422 and r.json()["code"] == "MODEL_TASK_MISMATCH"


# ---- /tokenize ---------------------------------------------------------------------------
def test_tokenize_gives_tei_tokens_with_byte_offsets(
    client: TestClient, auth: dict[str, str], models_dir: Path
) -> None:
    text = "café meeting"
    r = client.post("/tokenize", json={"inputs": text, "model": "tiny-embed"}, headers=auth)
    assert r.status_code == 200, r.text
    assert r.headers["x-tokens-used"] == "0" and r.headers["x-model"] == "tiny-embed"
    [tokens] = r.json()
    manifest = read_manifest(models_dir / "tiny-embed")
    reference = Tokenizer.from_file(
        str(models_dir / "tiny-embed" / manifest.files["tokenizer"].path)
    )
    assert [t["id"] for t in tokens] == reference.encode(text).ids
    assert tokens[0] == {
        "id": tokens[0]["id"],
        "text": "[CLS]",
        "special": True,
        "start": None,
        "stop": None,
    }
    assert tokens[-1]["special"] and tokens[-1]["text"] == "[SEP]"
    raw = text.encode()
    for t in tokens[1:-1]:
        assert not t["special"]
        assert raw[t["start"] : t["stop"]].decode() == t["text"]
    meeting = next(t for t in tokens if t["text"] == "meeting")
    assert meeting["start"] == len("café ".encode()) == 6  # bytes, not characters


def test_tokenize_batch_special_tokens_and_no_truncation(
    client: TestClient, auth: dict[str, str]
) -> None:
    r = client.post(
        "/tokenize",
        json={"inputs": ["hello", "meeting tomorrow"], "add_special_tokens": False},
        headers=auth,
    )
    rows = r.json()
    assert len(rows) == 2 and not any(t["special"] for row in rows for t in row)
    assert [t["text"] for t in rows[1]] == ["meeting", "tomorrow"]
    long = client.post("/tokenize", json={"inputs": " ".join(["report"] * 100)}, headers=auth)
    assert len(long.json()[0]) == 102  # all of them: a client measures length with this


# ---- /info -------------------------------------------------------------------------------
def test_info_describes_the_default_or_the_named_model(
    client: TestClient, auth: dict[str, str], models_dir: Path
) -> None:
    r = client.get("/info", headers=auth)
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["model_id"] == info["served_model_name"] == "tiny-embed"
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["max_input_length"] == read_manifest(models_dir / "tiny-embed").max_tokens
    assert info["max_client_batch_size"] == 1000 and info["version"] == appliance.__version__
    assert info["model_dtype"] == "int8" and info["auto_truncate"] is True
    for field in ("model_sha", "max_concurrent_requests", "max_batch_tokens", "max_batch_requests"):
        assert field in info
    cls = client.get("/info", params={"model": "tiny-cls"}, headers=auth).json()
    assert cls["model_type"] == {
        "classifier": {"id2label": {"0": "ham", "1": "spam"}, "label2id": {"ham": 0, "spam": 1}}
    }


def test_info_follows_config_limits(serve: Callable[..., TestClient], models_dir: Path) -> None:
    client = serve(
        models_dir,
        APPLIANCE_SERVER__MAX_BATCH_ITEMS="2",
        APPLIANCE_DEFAULTS__EMBEDDING="tiny-embed",
    )
    auth = key(client)
    assert client.get("/info", headers=auth).json()["max_client_batch_size"] == 2
    r = client.post("/embed", json={"inputs": ["a", "b", "c"]}, headers=auth)
    assert r.status_code == 422 and r.json()["details"]["max_items"] == 2


# ---- defaults, auth, limits --------------------------------------------------------------
def test_defaults_name_a_missing_model_or_none_is_installed(
    serve: Callable[..., TestClient], models_dir: Path, tmp_path: Path
) -> None:
    client = serve(
        models_dir, APPLIANCE_DEFAULTS__EMBEDDING="gone", APPLIANCE_DEFAULTS__RERANKER="tiny-cls"
    )
    auth = key(client)
    r = client.post("/embed", json={"inputs": "x"}, headers=auth)
    assert r.status_code == 404 and r.json()["details"]["model"] == "gone"
    # the rerank default comes from [defaults] too: a classifier is not a reranker
    rr = client.post("/rerank", json={"query": "q", "texts": ["a"]}, headers=auth)
    assert rr.status_code == 422 and rr.json()["code"] == "MODEL_TASK_MISMATCH"
    empty = tmp_path / "no-models"
    empty.mkdir()
    bare = serve(empty)
    auth = key(bare)
    for path, body in [("/embed", {"inputs": "x"}), ("/predict", {"inputs": "x"})]:
        r = bare.post(path, json=body, headers=auth)
        assert r.status_code == 404 and "appliance export" in r.json()["message"], path
    assert bare.get("/info", headers=auth).status_code == 404


ROUTES = [
    ("POST", "/embed", {"inputs": "x"}),
    ("POST", "/predict", {"inputs": "x"}),
    ("POST", "/tokenize", {"inputs": "x"}),
    ("GET", "/info", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_auth_on_every_route(
    client: TestClient, method: str, path: str, body: dict[str, str] | None
) -> None:
    def call(headers: dict[str, str]) -> int:
        return client.request(method, path, json=body, headers=headers).status_code

    assert call({}) == 401
    assert call({"x-api-key": "not-a-key"}) == 401
    assert call(key(client, ["jobs"])) == 403
    assert call(key(client)) == 200
    assert call({"Authorization": f"Bearer {key(client)['x-api-key']}"}) == 200


def test_a_key_limited_to_some_models(client: TestClient) -> None:
    auth = key(client, models=["tiny-cls"])
    # the default is the first model of the kind the key may use: none for embeddings, which
    # is the key's 403 (an embedding model is installed), not a 404 saying to export one
    refused = client.post("/embed", json={"inputs": "x"}, headers=auth)
    assert refused.status_code == 403 and refused.json()["code"] == "FORBIDDEN"
    assert "No embedding model is installed" not in refused.json()["message"]
    only_rerankers = key(client, models=["tiny-rerank-does-not-exist"])
    assert client.get("/info", headers=only_rerankers).status_code == 403
    named = client.post("/embed", json={"inputs": "x", "model": "tiny-embed"}, headers=auth)
    assert named.status_code == 403
    assert (
        client.post("/predict", json={"inputs": "x"}, headers=auth).headers["x-model"] == "tiny-cls"
    )
    assert client.get("/info", headers=auth).json()["model_id"] == "tiny-cls"


def test_rate_limit_and_body_limit(serve: Callable[..., TestClient], models_dir: Path) -> None:
    client = serve(
        models_dir,
        APPLIANCE_LIMITS__REQUESTS_PER_MINUTE="2",
        APPLIANCE_SERVER__MAX_BODY_BYTES="2000",
    )
    auth = key(client)
    big = client.post("/embed", json={"inputs": "x" * 3000}, headers=auth)
    assert big.status_code == 413
    statuses = [client.post("/tokenize", json={"inputs": "x"}, headers=auth) for _ in range(3)]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    assert "retry-after" in statuses[2].headers
    assert statuses[2].json()["code"] == "RATE_LIMIT_EXCEEDED"


# ---- batch jobs --------------------------------------------------------------------------
def test_tei_routes_run_as_batch_jobs(client: TestClient) -> None:
    secret = key(client, ["predict", "jobs"])["x-api-key"]
    lines = [{"inputs": TEXTS[0]}, {"inputs": TEXTS, "dimensions": 4}, {"inputs": []}]
    body = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    job, rows = run(client, secret, body, "/embed")
    assert job["status"] == "completed", job
    live = client.post("/embed", json=lines[0], headers={"x-api-key": secret}).json()
    assert np.allclose(rows[0]["response"], live, atol=1e-6)
    assert np.array(rows[1]["response"]).shape == (2, 4)
    assert rows[2]["status"] == 422
    job, rows = run(client, secret, b'{"inputs": "win money"}\n', "/predict", model="tiny-cls")
    assert rows[0]["status"] == 200 and {p["label"] for p in rows[0]["response"]} == {"ham", "spam"}
    job, rows = run(client, secret, b'{"inputs": ["a", "b"]}\n', "/tokenize")
    assert rows[0]["status"] == 200 and len(rows[0]["response"]) == 2


# ---- the real huggingface_hub client -----------------------------------------------------
@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path_factory.mktemp("tei-live"), models_dir).start()
    yield server
    server.stop()


def test_huggingface_hub_inference_client_feature_extraction(live: LiveServer) -> None:
    import httpx
    import requests
    from huggingface_hub import InferenceClient, configure_http_backend

    # The tests run with HF_HUB_OFFLINE=1, which makes the client's default session refuse
    # every URL; a plain session reaches this loopback server (never the Hub: the model is a URL).
    configure_http_backend(backend_factory=requests.Session)
    try:
        hub = InferenceClient(model=f"{live.url}/embed", token=live.key)
        vector = hub.feature_extraction("the invoice is wrong", normalize=True, truncate=True)
    finally:
        configure_http_backend()

    native = httpx.post(
        f"{live.url}/embed", json={"inputs": "the invoice is wrong"}, headers=live.headers
    ).json()
    assert vector.shape == (1, len(native[0]))
    assert np.allclose(vector, native, atol=1e-6)
