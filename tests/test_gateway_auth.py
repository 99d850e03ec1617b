"""Who may call what: the key matrix (missing/unknown/revoked/expired keys, scopes, models)."""

from __future__ import annotations

import pytest
from litestar.testing import TestClient

ENDPOINTS = [
    ("get", "/api/v1/models", None),
    ("get", "/v1/models/tiny-embed", None),
    ("post", "/api/v1/models/tiny-embed/predict", {"input": {"text": "hi"}}),
    ("post", "/v1/text-vectorisation", {"text": "hi", "model": "tiny-embed"}),
    ("post", "/text-vectorisation", {"text": "hi", "model": "tiny-embed"}),
]
IDS = [f"{m} {p}" for m, p, _ in ENDPOINTS]


def call(client: TestClient, method: str, path: str, body: object, headers: dict[str, str]):  # type: ignore[no-untyped-def]
    return getattr(client, method)(path, headers=headers, **({"json": body} if body else {}))


@pytest.mark.parametrize("method,path,body", ENDPOINTS, ids=IDS)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-api-key": "apl_wrong"},
        {"Authorization": "Bearer apl_wrong"},
        {"Authorization": "Basic abc"},
    ],
    ids=["none", "unknown-x-api-key", "unknown-bearer", "other-scheme"],
)
def test_missing_or_unknown_key_is_401(
    client: TestClient, method: str, path: str, body: object, headers: dict[str, str]
) -> None:
    r = call(client, method, path, body, headers)
    assert r.status_code == 401
    assert r.json()["code"] == "UNAUTHORIZED"


@pytest.mark.parametrize("method,path,body", ENDPOINTS, ids=IDS)
@pytest.mark.parametrize("style", ["bearer", "x-api-key"])
@pytest.mark.parametrize("scopes", [["predict"], ["admin"]])
def test_predict_or_admin_key_is_allowed(
    client: TestClient, method: str, path: str, body: object, style: str, scopes: list[str]
) -> None:
    _, secret = client.keys.create("k", scopes)  # type: ignore[attr-defined]
    headers = {"Authorization": f"Bearer {secret}"} if style == "bearer" else {"x-api-key": secret}
    assert call(client, method, path, body, headers).status_code == 200


@pytest.mark.parametrize("method,path,body", ENDPOINTS, ids=IDS)
def test_key_without_the_scope_is_403(
    client: TestClient, method: str, path: str, body: object
) -> None:
    _, secret = client.keys.create("jobs-only", ["jobs"])  # type: ignore[attr-defined]
    r = call(client, method, path, body, {"x-api-key": secret})
    assert r.status_code == 403
    assert r.json()["details"]["required_scope"] == "predict"


@pytest.mark.parametrize(
    "path,body",
    [
        ("/api/v1/models/tiny-embed/predict", {"input": {"text": "hi"}}),
        ("/v1/text-vectorisation", {"text": "hi", "model": "tiny-embed"}),
    ],
)
def test_key_limited_to_other_models_is_403(client: TestClient, path: str, body: object) -> None:
    _, secret = client.keys.create("cls-only", ["predict"], models=["tiny-cls"])  # type: ignore[attr-defined]
    r = client.post(path, json=body, headers={"x-api-key": secret})
    assert r.status_code == 403
    assert r.json()["details"]["model"] == "tiny-embed"


def test_revoked_key_is_refused_at_once(client: TestClient) -> None:
    key, secret = client.keys.create("k", ["predict"])  # type: ignore[attr-defined]
    headers = {"x-api-key": secret}
    assert client.get("/api/v1/models", headers=headers).status_code == 200
    # Revoked through a second store on the same file, as the CLI would.
    from appliance.gateway.keys import KeyStore

    KeyStore(client.keys.path).revoke(key.id)  # type: ignore[attr-defined]
    assert client.get("/api/v1/models", headers=headers).status_code == 401


def test_expired_key_is_401(client: TestClient) -> None:
    _, secret = client.keys.create("old", ["predict"], expires_at="2020-01-01T00:00:00+00:00")  # type: ignore[attr-defined]
    assert client.get("/api/v1/models", headers={"x-api-key": secret}).status_code == 401


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/docs", "/openapi.json"])
def test_open_endpoints_need_no_key(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 200
