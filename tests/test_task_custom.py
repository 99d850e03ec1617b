"""Custom models: an ONNX graph exported as INT8, its declared inputs fed from request fields."""

from __future__ import annotations

import numpy as np
import pytest


def test_custom_model_serves_its_declared_inputs(serve, custom_models) -> None:  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    original, models = custom_models
    client = serve(models)
    key = {"x-api-key": client.keys.create("k", ["predict"])[1]}
    detail = client.get("/v1/models/my-model", headers=key).json()["data"]
    assert detail["task"] == "custom" and detail["quantization"]["method"] == "dynamic-int8"
    x = np.linspace(-1, 1, 16, dtype=np.float32)
    body = {"my-custom-field": x.tolist(), "counts": [1, 2, 3, 4], "model": "my-model"}
    for path in ("/custom", "/v1/custom"):
        r = client.post(path, json=body, headers=key)
        assert r.status_code == 200, r.text
        out = r.json()["output"]
        ref_y, ref_total = ort.InferenceSession(str(original)).run(
            None, {"my-custom-field": x[None], "counts": np.array([[1, 2, 3, 4]])}
        )
        y = np.array(out["y"])
        assert y.shape == (1, 64)
        assert np.dot(y.ravel(), ref_y.ravel()) / (np.linalg.norm(y) * np.linalg.norm(ref_y)) > 0.99
        assert out["total"] == [10]
    predict = client.post(
        "/api/v1/models/my-model/predict",
        json={"input": {k: v for k, v in body.items() if k != "model"}},
        headers=key,
    )
    assert predict.status_code == 200 and predict.json()["output"]["output"]["total"] == [10]


@pytest.mark.parametrize(
    "body,field",
    [
        ({"counts": [1, 2, 3, 4]}, "my-custom-field"),
        ({"my-custom-field": [0.0] * 15, "counts": [1, 2, 3, 4]}, "my-custom-field"),
        ({"my-custom-field": "abc", "counts": [1, 2, 3, 4]}, "my-custom-field"),
        ({"my-custom-field": [0.0] * 16, "counts": [[[1]]]}, "counts"),
    ],
)
def test_bad_custom_inputs_are_422(serve, custom_models, body: dict, field: str) -> None:  # type: ignore[no-untyped-def]
    client = serve(custom_models[1])
    key = {"x-api-key": client.keys.create("k", ["predict"])[1]}
    r = client.post("/custom", json={**body, "model": "my-model"}, headers=key)
    assert r.status_code == 422, r.text
    assert f"`{field}`" in r.json()["message"]


def test_custom_needs_a_model(serve, custom_models) -> None:  # type: ignore[no-untyped-def]
    client = serve(custom_models[1])
    key = {"x-api-key": client.keys.create("k", ["predict"])[1]}
    assert client.post("/custom", json={"my-custom-field": [1]}, headers=key).status_code == 422
