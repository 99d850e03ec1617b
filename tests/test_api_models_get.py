"""The endpoint API's GET form (seeds/endpoint-api.txt, issue #18): `GET /models/{id}?text=...`
with an `x-api-key` header runs the model, answering and failing as POST .../predict does;
without query parameters the same paths give the model's details, as before."""

from __future__ import annotations

from typing import Any

import pytest
from litestar.testing import TestClient

from appliance.api.models import _query_value
from appliance.errors import ValidationFailed

PATHS = ["/models/{}", "/v1/models/{}", "/api/v1/models/{}"]
VOLATILE = {"request_id", "meta"}


@pytest.fixture
def auth(predict_key: str) -> dict[str, str]:
    return {"x-api-key": predict_key}


def stable(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in VOLATILE}


@pytest.mark.parametrize("path", PATHS)
def test_query_parameters_run_the_model_as_predict_does(
    client: TestClient, auth: dict[str, str], path: str
) -> None:
    url = path.format("tiny-cls")
    got = client.get(url, params={"text": "Hello world"}, headers=auth)
    assert got.status_code == 200, got.text
    posted = client.post(
        "/v1/models/tiny-cls/predict", json={"input": {"text": "Hello world"}}, headers=auth
    )
    assert stable(got.json()) == stable(posted.json())
    assert set(got.json()["output"]) == {"label", "score", "probabilities"}
    assert got.json()["meta"]["status"] == 200 and got.json()["request_id"]
    # the same model call: one cache entry, the same headers as every inference response
    assert posted.headers["x-cache"] == "HIT"
    assert got.headers["x-cache-key"] == posted.headers["x-cache-key"]
    assert got.headers["x-model"] == "tiny-cls" and "x-ratelimit-remaining-requests" in got.headers


def test_the_seeds_example_shape(client: TestClient, auth: dict[str, str]) -> None:
    # https://api.aixplain.com/models/sentiment?text=Hello+world with 'x-api-key'
    r = client.get("/models/tiny-cls?text=Hello+world", headers=auth)
    assert r.status_code == 200
    direct = client.post(
        "/v1/models/tiny-cls/predict", json={"input": {"text": "Hello world"}}, headers=auth
    )
    assert r.json()["output"] == direct.json()["output"]


def test_without_query_parameters_the_details_as_before(
    client: TestClient, auth: dict[str, str]
) -> None:
    task_api = client.get("/models/tiny-cls", headers=auth).json()
    assert task_api["name"] == "tiny-cls" and "build_message" in task_api
    models_api = client.get("/v1/models/tiny-cls", headers=auth).json()["data"]
    assert models_api["slug"] == "tiny-cls" and models_api["labels"] == ["ham", "spam"]
    # `truncate` alone is an option, not an input: still the details
    for options in ("truncate=false", "include_global=true"):
        assert "build_message" in client.get(f"/models/tiny-cls?{options}", headers=auth).json()


def test_list_fields_numbers_and_booleans_from_the_query(
    client: TestClient, auth: dict[str, str]
) -> None:
    query = "text=my+invoice&labels=billing&labels=weather&multi_label=true"
    got = client.get(f"/models/tiny-embed?{query}", headers=auth)
    assert got.status_code == 200, got.text
    body = {"text": "my invoice", "labels": ["billing", "weather"], "multi_label": True}
    posted = client.post("/v1/models/tiny-embed/predict", json={"input": body}, headers=auth)
    assert got.json()["output"] == posted.json()["output"]


@pytest.mark.parametrize(
    ("query", "body"),
    [
        ("text=a&text=b", {"text": ["a", "b"]}),  # a batch: BATCH_NOT_SUPPORTED
        ("labels=spam", {"labels": "spam"}),  # no text
        ("text=x&labels=nope&labels=spam", {"text": "x", "labels": ["nope", "spam"]}),
        ("text=+++", {"text": "   "}),
    ],
)
def test_the_same_errors_as_predict(
    client: TestClient, auth: dict[str, str], query: str, body: dict[str, Any]
) -> None:
    got = client.get(f"/models/tiny-cls?{query}", headers=auth)
    posted = client.post("/v1/models/tiny-cls/predict", json={"input": body}, headers=auth)
    assert got.status_code == posted.status_code == 422
    assert got.json()["code"] == posted.json()["code"]
    assert got.json()["message"] == posted.json()["message"]


def test_truncate_false_refuses_a_long_text(client: TestClient, auth: dict[str, str]) -> None:
    long = "+".join(["report"] * 300)
    assert client.get(f"/models/tiny-cls?text={long}", headers=auth).headers["x-truncated"]
    r = client.get(f"/models/tiny-cls?text={long}&truncate=false", headers=auth)
    assert r.status_code == 422 and r.json()["code"] == "INPUT_TOO_LONG"


def test_auth_unknown_models_and_keys_limited_to_others(client: TestClient) -> None:
    assert client.get("/models/tiny-cls?text=x").status_code == 401
    limited = client.keys.create("one", ["predict"], models=["tiny-embed"])[1]  # type: ignore[attr-defined]
    hidden = client.get("/models/tiny-cls?text=x", headers={"x-api-key": limited})
    assert hidden.status_code == 404  # as its details: a key does not learn what else exists
    jobs_only = client.keys.create("jobs", ["jobs"])[1]  # type: ignore[attr-defined]
    assert (
        client.get("/models/tiny-cls?text=x", headers={"x-api-key": jobs_only}).status_code == 403
    )
    admin = client.keys.create("admin", ["admin"])[1]  # type: ignore[attr-defined]
    r = client.get("/models/nope?text=x", headers={"x-api-key": admin})
    assert r.status_code == 404 and r.json()["code"] == "MODEL_NOT_FOUND"


@pytest.mark.parametrize(
    ("values", "example", "expected"),
    [
        (["hi"], "text", "hi"),
        (["12"], "text", "12"),  # a text field stays text even when it looks like a number
        (["a"], ["x"], ["a"]),
        (["a", "b"], None, ["a", "b"]),
        (["20"], 5, 20),
        (["0.5"], 1.0, 0.5),
        (["false"], True, False),
        (["0.7"], None, 0.7),
        (["true"], None, True),
        (["hello"], None, "hello"),
        (["[1]"], None, "[1]"),
    ],
)
def test_query_values_take_the_type_of_the_example_payload(
    values: list[str], example: Any, expected: Any
) -> None:
    got = _query_value("f", values, example)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(("values", "example"), [(["many"], 5), (["yes"], True), (["x"], 1.0)])
def test_a_query_value_that_is_not_the_examples_type_is_a_422(
    values: list[str], example: Any
) -> None:
    with pytest.raises(ValidationFailed, match="`f` must be"):
        _query_value("f", values, example)
