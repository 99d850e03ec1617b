"""/openapi.json documents the API; /docs renders from assets served by the appliance itself."""

from __future__ import annotations

import re

from litestar.testing import TestClient


def test_docs_page_loads_every_asset_locally(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    refs = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page.text)
    assert refs, "the docs page references no assets?"
    for ref in refs:
        assert ref.startswith("/"), f"{ref} is not served by the appliance (air-gapped sites)"
        r = client.get(ref)
        assert r.status_code == 200 and r.content, ref
    assert "http://" not in page.text and "https://" not in page.text


def test_openapi_lists_the_endpoints_and_auth(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert schema["openapi"].startswith("3.")
    for path in [
        "/api/v1/models",
        "/v1/models",
        "/api/v1/models/{slug}",
        "/api/v1/models/{slug}/predict",
        "/v1/text-vectorisation",
        "/text-vectorisation",
        "/healthz",
        "/readyz",
    ]:
        assert path in schema["paths"], path
    schemes = schema["components"]["securitySchemes"]
    assert schemes["bearer"]["scheme"] == "bearer"
    assert schemes["apiKey"]["name"] == "x-api-key"
    body = schema["paths"]["/v1/text-vectorisation"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]


def test_raw_uploads_are_documented(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path, media in (("/v1/batch", "application/x-ndjson"), ("/v1/models", "application/zip")):
        body = paths[path]["post"]["requestBody"]
        assert media in body["content"] and body["required"] is True
