"""Every error path answers with the API.md error body and the right status; never a 500."""

from __future__ import annotations

import pytest
from litestar.testing import TestClient

EMBED = "/v1/text-vectorisation"
PREDICT = "/api/v1/models/tiny-cls/predict"


def assert_error_body(r, status: int, code: str) -> dict:  # type: ignore[no-untyped-def]
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "code", "message", "details", "docs_url", "request_id"}
    assert body["code"] == code
    assert body["error"] == code.lower().replace("_", "-")
    assert body["message"]
    assert body["request_id"] == r.headers["x-request-id"]
    assert "Traceback" not in r.text
    return body


@pytest.mark.parametrize(
    "method,path,json_body,status,code,field",
    [
        ("post", EMBED, {"text": "a", "model": "nope"}, 404, "MODEL_NOT_FOUND", None),
        ("post", EMBED, {"text": 5, "model": "tiny-embed"}, 422, "VALIDATION_ERROR", "text"),
        ("post", EMBED, {"text": "", "model": "tiny-embed"}, 422, "VALIDATION_ERROR", "text"),
        ("post", EMBED, {"text": "   ", "model": "tiny-embed"}, 422, "VALIDATION_ERROR", "text"),
        ("post", EMBED, {"text": [], "model": "tiny-embed"}, 422, "VALIDATION_ERROR", "text"),
        (
            "post",
            EMBED,
            {"text": ["ok", ""], "model": "tiny-embed"},
            422,
            "VALIDATION_ERROR",
            "text",
        ),
        (
            "post",
            EMBED,
            {"text": ["ok", 3], "model": "tiny-embed"},
            422,
            "VALIDATION_ERROR",
            "text",
        ),
        ("post", EMBED, {"model": "tiny-embed"}, 422, "VALIDATION_ERROR", "text"),
        ("post", EMBED, {"text": "a", "model": 7}, 422, "VALIDATION_ERROR", "model"),
        ("post", EMBED, ["text"], 422, "VALIDATION_ERROR", None),
        ("post", PREDICT, {"input": {"txt": "a"}}, 422, "VALIDATION_ERROR", "text"),
        ("post", PREDICT, {"input": "a"}, 422, "VALIDATION_ERROR", "input"),
        ("post", PREDICT, {}, 422, "VALIDATION_ERROR", "input"),
        (
            "post",
            "/api/v1/models/nope/predict",
            {"input": {"text": "a"}},
            404,
            "MODEL_NOT_FOUND",
            None,
        ),
        ("get", "/no/such/route", None, 404, "NOT_FOUND", None),
        ("delete", "/api/v1/models", None, 405, "METHOD_NOT_ALLOWED", None),
    ],
)
def test_error_matrix(
    client: TestClient,
    predict_key: str,
    method: str,
    path: str,
    json_body: object,
    status: int,
    code: str,
    field: str | None,
) -> None:
    kwargs = {"json": json_body} if json_body is not None else {}
    r = getattr(client, method)(path, headers={"x-api-key": predict_key}, **kwargs)
    body = assert_error_body(r, status, code)
    if field is not None:
        assert f"`{field}" in body["message"]  # `text` or `text[1]`


@pytest.mark.parametrize(
    "body", [b"{not json", b'{"text": "cut sho', b'{"text": "\xff"}', b'{"text": "\\ud800"}']
)
def test_non_json_body_is_400(client: TestClient, predict_key: str, body: bytes) -> None:
    r = client.post(
        EMBED,
        content=body,
        headers={"x-api-key": predict_key, "content-type": "application/json"},
    )
    assert_error_body(r, 400, "INVALID_JSON")


def test_a_missing_body_says_so(client: TestClient, predict_key: str) -> None:
    for headers in ({"content-type": "application/json"}, {}):
        r = client.post(EMBED, content=b"", headers={"x-api-key": predict_key, **headers})
        assert_error_body(r, 422, "VALIDATION_ERROR")
        assert r.json()["message"] == "The request has no body: send a JSON object."


def test_body_over_the_limit_is_413(client: TestClient, predict_key: str) -> None:
    big = b'{"text": "' + b"a" * 1_100_000 + b'"}'
    r = client.post(
        EMBED, content=big, headers={"x-api-key": predict_key, "content-type": "application/json"}
    )
    assert_error_body(r, 413, "PAYLOAD_TOO_LARGE")


def test_unexpected_exception_is_a_generic_500(
    client: TestClient, predict_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance.inference import Inference

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret internal detail /etc/passwd")

    monkeypatch.setattr(Inference, "model_for", boom)
    r = client.post(
        EMBED, json={"text": "a", "model": "tiny-embed"}, headers={"x-api-key": predict_key}
    )
    body = assert_error_body(r, 500, "INTERNAL_ERROR")
    assert "secret" not in r.text and "passwd" not in body["message"]


def test_json_nested_too_deep_is_400_not_500(
    client: TestClient, predict_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    for path in (EMBED, PREDICT):
        r = client.post(
            path,
            content=deep,
            headers={"x-api-key": predict_key, "content-type": "application/json"},
        )
        body = assert_error_body(r, 400, "INVALID_JSON")
        assert "deep" in body["message"]
    assert "Traceback" not in caplog.text and "unhandled" not in caplog.text


@pytest.mark.parametrize(
    "method,path,allowed",
    [
        ("delete", "/api/v1/models", {"GET", "POST"}),
        ("put", EMBED, {"POST"}),
        ("post", "/healthz", {"GET"}),
    ],
)
def test_405_carries_the_path_methods_in_allow(
    client: TestClient, predict_key: str, method: str, path: str, allowed: set[str]
) -> None:
    r = client.request(method.upper(), path, headers={"x-api-key": predict_key})
    assert_error_body(r, 405, "METHOD_NOT_ALLOWED")
    got = {m.strip() for m in r.headers["allow"].split(",")}
    assert got - {"HEAD", "OPTIONS"} == allowed


def test_head_answers_wherever_get_does(client: TestClient, predict_key: str) -> None:
    """RFC 9110: HEAD is GET without the body, with the same status and headers."""
    auth = {"x-api-key": predict_key}
    for path in ("/healthz", "/readyz", "/v1/models", "/openapi.json", "/v1/usage"):
        got, head = client.get(path, headers=auth), client.head(path, headers=auth)
        assert head.status_code == got.status_code == 200, (path, head.text)
        assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"]
        if "content-length" in got.headers and path != "/v1/usage":
            assert head.headers["content-length"] == got.headers["content-length"]
    assert client.head("/v1/models").status_code == 401  # the GET's refusal, too
    refused = client.head(EMBED, headers=auth)  # no GET there: 405, as for any method
    assert refused.status_code == 405 and "HEAD" not in refused.headers["allow"]
    assert "HEAD" in client.post("/healthz").headers["allow"]
