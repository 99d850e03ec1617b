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


def test_every_operation_declares_the_error_body_and_headers(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    error = schema["components"]["schemas"]["Error"]
    assert set(error["required"]) == {
        "error",
        "code",
        "message",
        "details",
        "docs_url",
        "request_id",
    }
    for path, item in schema["paths"].items():
        for method, op in item.items():
            if method not in {"get", "post", "put", "delete", "patch"}:
                continue
            for status in ("400", "404", "405", "422", "500", "503"):
                response = op["responses"][status]
                ref = response["content"]["application/json"]["schema"]["$ref"]
                assert ref == "#/components/schemas/Error", (path, method, status)
                assert "X-Request-ID" in response["headers"]
            assert "Retry-After" in op["responses"]["503"]["headers"]
            assert "Allow" in op["responses"]["405"]["headers"]
    predict = schema["paths"]["/api/v1/models/{slug}/predict"]["post"]["responses"]
    assert {"X-Tokens-Used", "X-Cache", "X-RateLimit-Remaining-Requests"} <= set(
        predict["200"]["headers"]
    )
    assert "Retry-After" in predict["429"]["headers"] and "401" in predict


def test_open_routes_need_no_key_and_metrics_is_prometheus_text(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
        assert paths[path]["get"]["security"] == [], path
        assert "401" not in paths[path]["get"]["responses"]
        assert path in schema["info"]["description"], path
        # What the document says is what the server does: answered without a key.
        assert client.get(path).status_code == 200, path
    assert list(paths["/docs"]["get"]["responses"]["200"]["content"]) == ["text/html"]
    assert list(paths["/openapi.json"]["get"]["responses"]["200"]["content"]) == [
        "application/vnd.oai.openapi+json"
    ]
    assert "security" not in paths["/api/v1/models"]["get"]
    ok = paths["/metrics"]["get"]["responses"]["200"]
    assert list(ok["content"]) == ["text/plain; version=0.0.4"]
