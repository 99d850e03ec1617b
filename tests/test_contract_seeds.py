"""Contract: the example requests of the hosted APIs' documents (shared/seeds), replayed
exactly as written against the appliance, get the documented response shapes.

The seeds call every model "english" (or "clip", "gpt2-large", "my-model"); here those names
are aliases onto tiny exported models, per endpoint, as an operator would configure them.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from litestar.testing import TestClient

# The seed documents live in shared/ beside the checkout (as on every developer machine and
# in CI); without them there is nothing to replay.
SEEDS = Path(__file__).resolve().parents[2] / "shared" / "seeds"
TASK_API = SEEDS / "task-api.txt"
if not TASK_API.is_file():
    pytest.skip(f"seed documents not found at {SEEDS}", allow_module_level=True)

# What each task-API endpoint answers (the "200 Response" examples of the document).
RESPONSE_KEYS = {
    "text-vectorisation": {"vector"},
    "qa": {"answer"},
    "text-classification": {"probabilities"},
    "image-classification": {"probabilities"},
    "image-vectorisation": {"vector"},
    "text-generation": {"output"},
    "summarisation": {"output"},
    "emotion": {"output"},
    "custom": {"output"},
}


def seed_examples() -> list[tuple[str, dict]]:
    """(path, body) for every `curl --url ... --data '...'` example in the task API document."""
    text = TASK_API.read_text()
    pattern = re.compile(
        r"--url https://api\.backprop\.co/([\w-]+)[^\n]*\n(?:[^\n]*\n){0,4}?\s*--data '([^']*)'"
    )
    return [(path, json.loads(body)) for path, body in pattern.findall(text)]


def test_the_seed_document_is_parsed() -> None:
    paths = [p for p, _ in seed_examples()]
    assert {
        "text-vectorisation",
        "qa",
        "text-classification",
        "emotion",
        "custom",
        "upload-url",
    } <= set(paths)


@pytest.fixture(scope="module")
def contract_models(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("contract-models")
    for slug in ("tiny-embed", "tiny-cls", "tiny-tags"):
        shutil.copytree(models_dir / slug, out / slug)
    return out


@pytest.fixture
def contract_client(serve, contract_models: Path, qa_model, custom_models) -> TestClient:  # type: ignore[no-untyped-def]
    qa_models, custom = qa_model[1], custom_models[1]
    shutil.copytree(qa_models / "tiny-qa", contract_models / "tiny-qa", dirs_exist_ok=True)
    shutil.copytree(custom / "my-model", contract_models / "my-model", dirs_exist_ok=True)
    aliases = {
        "qa": {"english": "tiny-qa"},
        "text-classification": {"english": "tiny-embed"},
        "emotion": {"english": "tiny-embed"},
    }
    return serve(
        contract_models,
        APPLIANCE_ALIASES__ENGLISH="tiny-embed",
        APPLIANCE_ENDPOINT_ALIASES=json.dumps(aliases),
    )


IMPLEMENTED = {"text-vectorisation", "qa", "text-classification", "emotion", "custom", "upload-url"}


@pytest.mark.parametrize(
    "path,body",
    [pytest.param(p, b, id=p) for p, b in seed_examples() if p in IMPLEMENTED],
)
def test_seed_example_gets_the_documented_shape(
    contract_client: TestClient, path: str, body: dict
) -> None:
    admin = {"x-api-key": contract_client.keys.create("k", ["admin"])[1]}  # type: ignore[attr-defined]
    if path == "custom":
        # The document's field is a placeholder; the appliance's custom model declares its own.
        body = {"my-custom-field": [0.5] * 16, "counts": [1, 2, 3, 4], "model": body["model"]}
    for prefix in ("/", "/v1/"):
        if path == "upload-url" and prefix == "/v1/":
            continue
        r = contract_client.post(prefix + path, json=body, headers=admin)
        assert r.status_code == 200, (path, r.text)
        if path == "upload-url":
            assert isinstance(r.json(), str) and "/uploads/" in r.json()
            continue
        assert set(r.json()) == RESPONSE_KEYS[path], (path, r.json())
        for header in ("X-Request-ID", "X-Cache", "X-Tokens-Used", "X-RateLimit-Limit-Requests"):
            assert header in r.headers


def test_seed_batch_examples(contract_client: TestClient) -> None:
    key = {"x-api-key": contract_client.keys.create("k", ["predict"])[1]}  # type: ignore[attr-defined]
    batch_vectors = contract_client.post(
        "/text-vectorisation",
        json={"text": ["iPhone 12 128GB", "RTX 3090"], "model": "english"},
        headers=key,
    ).json()["vector"]
    assert len(batch_vectors) == 2 and isinstance(batch_vectors[0], list)
    body = {
        "text": [
            "I am really mad because my product broke.",
            "I would like to collaborate with you on social media",
        ],
        "labels": [
            ["product issue", "furniture", "space"],
            ["product issue", "furniture", "sales"],
        ],
        "model": "english",
    }
    probabilities = contract_client.post("/text-classification", json=body, headers=key).json()[
        "probabilities"
    ]
    assert [list(p) for p in probabilities] == body["labels"]
    emotions = contract_client.post(
        "/emotion",
        json={
            "text": ["I hope this works", "I'll be most upset if things go wrong"],
            "model": "english",
        },
        headers=key,
    ).json()["output"]
    assert len(emotions) == 2 and all(isinstance(e, str) for e in emotions)


def test_task_api_models_list_shape(contract_client: TestClient) -> None:
    key = {"x-api-key": contract_client.keys.create("k", ["predict"])[1]}  # type: ignore[attr-defined]
    listed = contract_client.get("/models?include_global=true", headers=key).json()
    assert listed and all(
        set(m) == {"id", "name", "description", "tasks", "build_status", "last_deployment"}
        for m in listed
    )
    detail = contract_client.get(f"/models/{listed[0]['name']}", headers=key).json()
    assert {"build_message", "model_url", "config_url", "requirements_url"} <= set(detail)
    missing = contract_client.get("/models/string", headers=key)
    assert missing.status_code == 404


def test_models_predict_seed(contract_client: TestClient) -> None:
    """seeds/models-predict-api.txt: list, details, and the spam/ham predict example."""
    bearer = {"Authorization": f"Bearer {contract_client.keys.create('k', ['predict'])[1]}"}  # type: ignore[attr-defined]
    data = contract_client.get("/api/v1/models", headers=bearer).json()["data"]
    assert {"code", "name", "slug", "call_url", "is_active"} <= set(data[0])
    detail = contract_client.get("/api/v1/models/tiny-cls", headers=bearer).json()["data"]
    assert {"code", "name", "slug", "call_url", "example_payload", "is_active"} <= set(detail)
    r = contract_client.post(
        detail["call_url"], json={"input": {"text": "Offre gratuite, cliquez ici"}}, headers=bearer
    )
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"request_id", "model", "output", "meta"}
    assert set(body["model"]) == {"code", "name"} and body["output"]["label"] in {"spam", "ham"}
    assert 0 <= body["output"]["score"] <= 1 and body["meta"]["status"] == 200
    batch = contract_client.post(
        detail["call_url"], json={"input": [{"text": "a"}]}, headers=bearer
    )
    assert batch.status_code == 422 and batch.json()["code"] == "BATCH_NOT_SUPPORTED"
