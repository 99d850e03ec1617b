"""POST /v1/text-vectorisation (and the seed's root path): single and batch, against PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from litestar.testing import TestClient

from exporters.samples import SAMPLE_TEXTS


def torch_embeddings(folder: Path, texts: list[str]) -> np.ndarray:
    """Mean-pooled, L2-normalised hidden states from the PyTorch model itself."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


@pytest.mark.parametrize("path", ["/v1/text-vectorisation", "/text-vectorisation"])
def test_single_text_gives_one_vector_close_to_pytorch(
    client: TestClient, predict_key: str, checkpoints: dict[str, Path], path: str
) -> None:
    text = "iPhone 12 128GB"
    r = client.post(
        path, json={"text": text, "model": "tiny-embed"}, headers={"x-api-key": predict_key}
    )
    assert r.status_code == 200, r.text
    vector = np.array(r.json()["vector"])
    assert vector.shape == (32,)
    assert abs(np.linalg.norm(vector) - 1) < 1e-4
    ref = torch_embeddings(checkpoints["tiny-embed"], [text])
    assert cosines(vector[None], ref)[0] >= 0.99
    from transformers import AutoTokenizer

    n_tokens = len(AutoTokenizer.from_pretrained(checkpoints["tiny-embed"])(text)["input_ids"])
    assert r.headers["x-tokens-used"] == str(n_tokens)


def test_batch_keeps_order_and_matches_pytorch(
    client: TestClient, predict_key: str, checkpoints: dict[str, Path]
) -> None:
    texts = SAMPLE_TEXTS[:8]
    r = client.post(
        "/v1/text-vectorisation",
        json={"text": texts, "model": "tiny-embed"},
        headers={"Authorization": f"Bearer {predict_key}"},
    )
    assert r.status_code == 200, r.text
    vectors = np.array(r.json()["vector"])
    assert vectors.shape == (len(texts), 32)
    ref = torch_embeddings(checkpoints["tiny-embed"], texts)
    assert cosines(vectors, ref).min() >= 0.99
    # Order: each served vector is closest to its own reference.
    assert (np.argmax(vectors @ ref.T, axis=1) == np.arange(len(texts))).all()


def test_long_text_is_truncated_and_says_so(client: TestClient, predict_key: str) -> None:
    long = "word " * 500
    r = client.post(
        "/v1/text-vectorisation",
        json={"text": long, "model": "tiny-embed"},
        headers={"x-api-key": predict_key},
    )
    assert r.status_code == 200
    assert r.headers["x-truncated"] == "true"
    assert r.headers["x-tokens-used"] == "64"  # the tiny tokenizer's max length


def test_long_text_without_truncation_is_422(client: TestClient, predict_key: str) -> None:
    r = client.post(
        "/v1/text-vectorisation",
        json={"text": "word " * 500, "model": "tiny-embed", "truncate": False},
        headers={"x-api-key": predict_key},
    )
    assert r.status_code == 422
    assert r.json()["code"] == "INPUT_TOO_LONG"
    assert r.json()["details"]["max_tokens"] == 64


def test_classifier_is_refused_for_vectorisation(client: TestClient, predict_key: str) -> None:
    r = client.post(
        "/v1/text-vectorisation",
        json={"text": "hi", "model": "tiny-cls"},
        headers={"x-api-key": predict_key},
    )
    assert r.status_code == 422
    assert r.json()["code"] == "MODEL_TASK_MISMATCH"


def test_batch_over_the_item_limit_is_422(serve, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    client = serve(models_dir, APPLIANCE_SERVER__MAX_BATCH_ITEMS="3")
    key = client.keys.create("k", ["predict"])[1]
    r = client.post(
        "/v1/text-vectorisation",
        json={"text": ["a", "b", "c", "d"], "model": "tiny-embed"},
        headers={"x-api-key": key},
    )
    assert r.status_code == 422
    assert r.json()["details"]["max_items"] == 3
