"""The real default model (all-MiniLM-L6-v2 from its PyPI package), exported by the exporter
and served: INT8 embeddings stay close to PyTorch fp32 and keep their meaning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from litestar.testing import TestClient

from appliance.models.manifest import read_manifest
from exporters.defaults import DEFAULTS, package_folder

pytestmark = pytest.mark.real_model

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
    "The cat sits outside.",
    "A man is playing guitar.",
    "How do I reset my password?",
]


@pytest.fixture(scope="module")
def real_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exporters.export import export_model

    model = DEFAULTS[0]
    out = tmp_path_factory.mktemp("real-models")
    export_model(package_folder(model), model.task, out_dir=out, slug=model.slug, name=model.name)
    return out


def pytorch_fp32(texts: list[str]) -> np.ndarray:
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = package_folder(DEFAULTS[0])
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()


def test_int8_file_is_under_35_percent_of_fp32(real_models: Path) -> None:
    m = read_manifest(real_models / "all-minilm-l6-v2")
    assert m.sizes["int8_bytes"] < 0.35 * m.sizes["fp32_bytes"]
    assert m.dimension == 384 and m.max_tokens == 256
    assert m.validation is not None and m.validation.metrics["mean_cosine"] >= 0.99


def test_served_embeddings_match_pytorch_and_keep_meaning(serve, real_models: Path) -> None:  # type: ignore[no-untyped-def]
    client: TestClient = serve(real_models)
    key = client.keys.create("k", ["predict"])[1]
    r = client.post(
        "/v1/text-vectorisation",
        json={"text": SENTENCES, "model": "english"},
        headers={"x-api-key": key},
    )
    assert r.status_code == 200, r.text
    served = np.array(r.json()["vector"])
    reference = pytorch_fp32(SENTENCES)
    cos = (served * reference).sum(1) / np.linalg.norm(served, axis=1)
    assert cos.min() >= 0.99, cos

    sim = served @ served.T
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[0, 3]  # eating ~ eating, not movie/cat
    assert sim[0, 4] > sim[0, 5]  # a man doing something ~ man eating, more than a password
