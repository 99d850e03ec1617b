"""/v1/embeddings, driven by the official `openai` Python client pointed at the appliance."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from litestar.testing import TestClient
from openai import AuthenticationError, OpenAI, UnprocessableEntityError


@pytest.fixture
def openai_client(client: TestClient, predict_key: str) -> OpenAI:
    # TestClient is an httpx.Client: the real client library talks to the app in-process.
    return OpenAI(
        base_url=f"{client.base_url}/v1", api_key=predict_key, http_client=client, max_retries=0
    )


def test_openai_client_gets_embeddings(
    openai_client: OpenAI, client: TestClient, predict_key: str
) -> None:
    texts = ["iPhone 12 128GB", "RTX 3090"]
    result = openai_client.embeddings.create(model="tiny-embed", input=texts)
    assert result.object == "list" and result.model == "tiny-embed"
    assert [d.index for d in result.data] == [0, 1]
    assert result.usage.prompt_tokens == result.usage.total_tokens > 0
    native = client.post(
        "/v1/text-vectorisation",
        json={"text": texts, "model": "tiny-embed"},
        headers={"x-api-key": predict_key},
    ).json()["vector"]
    assert np.allclose([d.embedding for d in result.data], native, atol=1e-6)


def test_single_string_base64_and_dimensions(openai_client: OpenAI) -> None:
    full = openai_client.embeddings.create(model="tiny-embed", input="hello").data[0].embedding
    short = (
        openai_client.embeddings.create(model="tiny-embed", input="hello", dimensions=8)
        .data[0]
        .embedding
    )
    assert len(short) == 8 and np.linalg.norm(short) == pytest.approx(1.0, abs=1e-5)
    v = np.array(full[:8])
    assert np.allclose(short, v / np.linalg.norm(v), atol=1e-5)
    # The client decodes base64 itself when asked for it.
    b64 = openai_client.embeddings.create(
        model="tiny-embed", input="hello", encoding_format="base64"
    )
    raw = b64.data[0].embedding
    decoded = (
        np.frombuffer(base64.b64decode(raw), dtype="<f4") if isinstance(raw, str) else np.array(raw)
    )
    assert np.allclose(decoded, full, atol=1e-6)


def test_errors_come_back_as_the_client_expects(client: TestClient) -> None:
    bad_key = OpenAI(
        base_url=f"{client.base_url}/v1", api_key="apl_wrong", http_client=client, max_retries=0
    )
    with pytest.raises(AuthenticationError):
        bad_key.embeddings.create(model="tiny-embed", input="x")


def test_token_arrays_and_bad_dimensions_are_422(openai_client: OpenAI) -> None:
    with pytest.raises(UnprocessableEntityError):
        openai_client.embeddings.create(model="tiny-embed", input=[[1, 2, 3]])
    with pytest.raises(UnprocessableEntityError):
        openai_client.embeddings.create(model="tiny-embed", input="x", dimensions=10_000)


def test_openai_client_lists_models(openai_client: OpenAI, client: TestClient) -> None:
    page = openai_client.models.list()
    ids = [m.id for m in page.data]
    assert "tiny-embed" in ids and None not in ids
    for m in page.data:
        assert m.object == "model" and m.owned_by == "appliance"
        assert isinstance(m.created, int) and m.created > 1_600_000_000
    # GET /v1/models/{slug} keeps the models-predict seed's {"data": ...} envelope.
