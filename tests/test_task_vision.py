"""The image tasks end to end: a tiny CLIP and a tiny ViT classifier exported to INT8 by the
exporter, served by the app, and compared with the PyTorch models for JPEG, PNG and WebP
inputs; image preprocessing against transformers' processors; bad inputs are 422s."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from litestar.testing import TestClient
from PIL import Image, ImageDraw

from appliance.config import RuntimeConfig
from appliance.errors import ValidationFailed
from appliance.models.manifest import read_manifest, verify
from appliance.runtime.images import ImagePreprocessor, decode_image
from appliance.runtime.session import create_session
from appliance.tasks import build_runner
from exporters.checkpoint import ExportError
from exporters.export import export_model
from exporters.vision import read_preprocessing
from tests.vision_models import VIT_LABELS, build_tiny_clip, build_tiny_vit

LABELS = ["red square", "blue circle", "green triangle", "cat"]
FORMATS = ["JPEG", "PNG", "WEBP"]


# ---- fixtures: checkpoints, exported models, PyTorch references -------------------------------


@pytest.fixture(scope="module")
def vision_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vision-checkpoints")
    return {"clip": build_tiny_clip(root / "clip"), "vit": build_tiny_vit(root / "vit")}


@pytest.fixture(scope="module")
def vision_models(
    tmp_path_factory: pytest.TempPathFactory, vision_checkpoints: dict[str, Path]
) -> Path:
    out = tmp_path_factory.mktemp("vision-models")
    options = {"min_cosine": 0.99}
    export_model(
        vision_checkpoints["clip"],
        "zero-shot-image-classification",
        out_dir=out,
        slug="tiny-clip",
        options=options,
    )
    vit = vision_checkpoints["vit"]
    export_model(vit, "image-classification", out_dir=out, slug="tiny-vit", options=options)
    return out


@pytest.fixture
def vision_client(serve: Callable[..., TestClient], vision_models: Path) -> TestClient:
    return serve(
        vision_models,
        APPLIANCE_ALIASES__CLIP="tiny-clip",
        # The seed's image-classification example names model "english".
        APPLIANCE_ENDPOINT_ALIASES='{"image-classification": {"english": "tiny-clip"}}',
    )


@pytest.fixture
def key(vision_client: TestClient) -> dict[str, str]:
    return {"x-api-key": vision_client.keys.create("k", ["predict"])[1]}  # type: ignore[attr-defined]


class TorchClip:
    """The PyTorch CLIP with transformers' own tokenizer and image processor."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        self.model = CLIPModel.from_pretrained(folder).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.processor = CLIPImageProcessor.from_pretrained(folder)

    def images(self, images: list[Image.Image]) -> np.ndarray:
        import torch

        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            out = self.model.get_image_features(pixel_values=pixels)
        return torch.nn.functional.normalize(out).numpy()

    def texts(self, texts: list[str]) -> np.ndarray:
        import torch

        batch = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            out = self.model.get_text_features(**batch)
        return torch.nn.functional.normalize(out).numpy()

    def zero_shot(self, queries: np.ndarray, prompts: list[str]) -> np.ndarray:
        logits = float(self.model.logit_scale.exp()) * queries @ self.texts(prompts).T
        z = np.exp(logits - logits.max(-1, keepdims=True))
        return z / z.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def torch_clip(vision_checkpoints: dict[str, Path]) -> TorchClip:
    return TorchClip(vision_checkpoints["clip"])


def torch_vit(folder: Path, images: list[Image.Image]) -> np.ndarray:
    import torch
    from transformers import ViTForImageClassification, ViTImageProcessor

    model = ViTForImageClassification.from_pretrained(folder).eval()
    pixels = ViTImageProcessor.from_pretrained(folder)(images=images, return_tensors="pt")
    with torch.inference_mode():
        return torch.softmax(model(**pixels).logits, -1).numpy()


# ---- test images ---------------------------------------------------------------------------


def picture(seed: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A deterministic 'photo': a noisy gradient with a few shapes on it."""
    rng = np.random.default_rng(seed)
    w, h = size
    ys, xs = np.mgrid[0:h, 0:w]
    base = np.stack([xs * 255 // w, ys * 255 // h, np.full_like(xs, 40 * seed % 255)], -1)
    noisy = (base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(noisy)
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse((x - w // 5, y - h // 5, x + w // 5, y + h // 5), fill=colour)
    return image


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt != "PNG" else {}))
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def decoded(data: bytes) -> Image.Image:
    """What the server sees: the file as pillow decodes it (JPEG and WebP are lossy)."""
    return Image.open(io.BytesIO(data)).convert("RGB")


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


# ---- export ----------------------------------------------------------------------------------


def test_clip_manifest_has_two_int8_towers_and_its_preprocessing(vision_models: Path) -> None:
    folder = vision_models / "tiny-clip"
    m = read_manifest(folder)
    verify(folder, m)
    assert m.task == "zero-shot-image-classification"
    assert set(m.files) == {"model", "text_model", "tokenizer"}
    for role in ("model", "text_model"):
        graph = onnx.load(str(folder / m.files[role].path)).graph
        assert {n.op_type for n in graph.node} & {"MatMulInteger", "DynamicQuantizeLinear"}
    assert m.dimension == 16 and m.normalize and m.max_tokens == 32
    pre = m.config["preprocessing"]
    assert pre["resize"] == {"shortest_edge": 32} and pre["resample"] == "bicubic"
    assert pre["center_crop"] == {"height": 32, "width": 32}
    assert m.config["visual_tokens"] == (32 // 8) ** 2 + 1
    assert m.config["logit_scale"] == pytest.approx(100.0, rel=1e-4)
    assert "{label}" in m.config["prompt_template"]
    assert set(m.config["towers"]) == {"vision", "text"}
    assert m.sizes["int8_bytes"] < m.sizes["fp32_bytes"]
    assert m.validation is not None and m.validation.passed
    metrics = m.validation.metrics
    assert metrics["image_min_cosine"] >= 0.99 and metrics["text_min_cosine"] >= 0.99
    assert metrics["zero_shot_argmax_agreement"] >= 0.9
    assert metrics["zero_shot_decided_agreement"] >= 0.9 and metrics["zero_shot_decided_samples"]
    assert decode_image(m.example_payload["image"]).format == "PNG"
    assert m.example_payload["labels"]


def test_classifier_manifest_has_labels(vision_models: Path) -> None:
    m = read_manifest(vision_models / "tiny-vit")
    assert m.task == "image-classification" and m.labels == VIT_LABELS
    assert m.config["preprocessing"]["resize"] == {"height": 32, "width": 32}
    assert m.config["preprocessing"]["center_crop"] is None
    assert m.validation is not None and m.validation.passed
    assert m.validation.metrics["argmax_agreement"] >= 0.9


def test_export_refuses_below_the_threshold(
    tmp_path: Path, vision_checkpoints: dict[str, Path]
) -> None:
    with pytest.raises(ExportError, match="disagrees"):
        export_model(
            vision_checkpoints["vit"],
            "image-classification",
            out_dir=tmp_path,
            slug="x",
            options={"min_cosine": 1.01},
        )
    assert [p.name for p in tmp_path.iterdir()] == []


def test_fp16_export_for_gpu_serving(tmp_path: Path, vision_checkpoints: dict[str, Path]) -> None:
    m = export_model(
        vision_checkpoints["clip"],
        "zero-shot-image-classification",
        out_dir=tmp_path,
        slug="half",
        precision="fp16",
    )
    assert m.quantization.method == "fp16" and not m.quantization.nodes_excluded
    assert m.validation is not None and m.validation.metrics["min_cosine"] >= 0.999
    graph = onnx.load(str(tmp_path / "half" / "text_model.onnx")).graph
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)


def test_export_refuses_a_checkpoint_of_another_kind(
    tmp_path: Path, vision_checkpoints: dict[str, Path]
) -> None:
    with pytest.raises(ExportError, match="CLIP"):
        export_model(
            vision_checkpoints["vit"], "zero-shot-image-classification", out_dir=tmp_path, slug="x"
        )


def test_layers_int8_hurts_most_are_kept_in_fp32(
    tmp_path: Path, vision_checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import exporters.vision as vision

    # The tiny CLIP already meets the 0.99 goal: ask for more, at any size, so the search runs.
    monkeypatch.setattr(vision, "FIDELITY_GOAL", 1.0)
    monkeypatch.setattr(vision, "MAX_SIZE_RATIO", 2.0)
    m = export_model(
        vision_checkpoints["clip"], "zero-shot-image-classification", out_dir=tmp_path, slug="k"
    )
    towers = m.config["towers"]
    kept = m.quantization.nodes_excluded
    assert kept and kept == towers["vision"]["kept_fp32"] + towers["text"]["kept_fp32"]
    assert all(n.startswith("/text_") for n in towers["text"]["kept_fp32"])
    graph = onnx.load(str(tmp_path / "k" / "text_model.onnx")).graph
    float_matmuls = {n.name for n in graph.node if n.op_type == "MatMul"}
    assert set(towers["text"]["kept_fp32"]) <= float_matmuls
    assert m.validation is not None and m.validation.passed


# ---- preprocessing against transformers --------------------------------------------------------


@pytest.mark.parametrize(
    "processor",
    [
        {"cls": "CLIPImageProcessor"},
        {"cls": "CLIPImageProcessor", "size": {"shortest_edge": 24}, "crop_size": 28},
        {"cls": "CLIPImageProcessor", "resample": 2, "size": {"height": 20, "width": 36}},
        {"cls": "ViTImageProcessor", "size": {"height": 30, "width": 26}},
    ],
)
@pytest.mark.parametrize("size", [(96, 72), (40, 130), (9, 7), (32, 32)])
def test_preprocessing_matches_transformers(
    tmp_path: Path, processor: dict[str, Any], size: tuple[int, int]
) -> None:
    import transformers

    kwargs = {k: v for k, v in processor.items() if k != "cls"}
    getattr(transformers, processor["cls"])(**kwargs).save_pretrained(tmp_path)
    ours = ImagePreprocessor.from_config(read_preprocessing(tmp_path))
    theirs = transformers.AutoImageProcessor.from_pretrained(tmp_path, use_fast=False)
    image = picture(3, size)
    expected = theirs(images=[image], return_tensors="np")["pixel_values"][0]
    got = ours(image)
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)


# ---- CLIP through the API ----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("path", ["/v1/image-vectorisation", "/image-vectorisation"])
def test_image_vector_matches_pytorch(
    vision_client: TestClient, key: dict[str, str], torch_clip: TorchClip, fmt: str, path: str
) -> None:
    data = encode(picture(1), fmt)
    r = vision_client.post(path, json={"image": b64(data), "model": "tiny-clip"}, headers=key)
    assert r.status_code == 200, r.text
    vector = np.array(r.json()["vector"])
    assert vector.shape == (16,) and abs(np.linalg.norm(vector) - 1) < 1e-4
    assert cosine(vector, torch_clip.images([decoded(data)])[0]) >= 0.99
    assert r.headers["x-tokens-used"] == "17" and r.headers["x-model"] == "tiny-clip"


def test_image_vector_batch_keeps_order(
    vision_client: TestClient, key: dict[str, str], torch_clip: TorchClip
) -> None:
    files = [encode(picture(seed, (60 + 9 * seed, 80)), FORMATS[seed % 3]) for seed in range(6)]
    images = [b64(f) for f in files]
    images[0] = "data:image/jpeg;base64," + images[0]  # a data URL is accepted
    images[1] = "\n".join(images[1][i : i + 76] for i in range(0, len(images[1]), 76))
    # The default model is "clip" (an alias here).
    r = vision_client.post("/v1/image-vectorisation", json={"image": images}, headers=key)
    assert r.status_code == 200, r.text
    vectors = np.array(r.json()["vector"])
    assert vectors.shape == (6, 16)
    ref = torch_clip.images([decoded(f) for f in files])
    assert cosine(vectors, ref).min() >= 0.99
    assert r.headers["x-tokens-used"] == str(6 * 17)


def test_text_vector_through_predict_shares_the_space(
    vision_client: TestClient, key: dict[str, str], torch_clip: TorchClip
) -> None:
    text = "a photo of a red square."
    r = vision_client.post(
        "/api/v1/models/tiny-clip/predict", json={"input": {"text": text}}, headers=key
    )
    assert r.status_code == 200, r.text
    body = r.json()
    vector = np.array(body["output"]["vector"])
    assert vector.shape == (16,) and cosine(vector, torch_clip.texts([text])[0]) >= 0.99
    assert body["meta"]["tokens"] == len(torch_clip.tokenizer(text)["input_ids"])
    # Text and image vectors of one model: their similarity is the model's own.
    image = encode(picture(2), "PNG")
    r = vision_client.post(
        "/v1/image-vectorisation", json={"image": b64(image), "model": "tiny-clip"}, headers=key
    )
    ours = float(np.dot(vector, r.json()["vector"]))
    theirs = float(torch_clip.texts([text])[0] @ torch_clip.images([decoded(image)])[0])
    assert ours == pytest.approx(theirs, abs=0.02)
    # /v1/text-vectorisation takes CLIP models too: the same vectors.
    r = vision_client.post(
        "/v1/text-vectorisation", json={"text": [text], "model": "tiny-clip"}, headers=key
    )
    assert r.status_code == 200, r.text
    assert cosine(np.array(r.json()["vector"][0]), vector) >= 0.9999


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_shot_image_classification_matches_pytorch(
    vision_client: TestClient, key: dict[str, str], torch_clip: TorchClip, fmt: str
) -> None:
    files = [encode(picture(seed), fmt) for seed in range(4)]
    r = vision_client.post(
        "/image-classification",
        json={"image": [b64(f) for f in files], "labels": LABELS, "model": "tiny-clip"},
        headers=key,
    )
    assert r.status_code == 200, r.text
    results = r.json()
    assert isinstance(results, list) and len(results) == 4
    prompts = [f"a photo of a {label}." for label in LABELS]
    ref = torch_clip.zero_shot(torch_clip.images([decoded(f) for f in files]), prompts)
    for result, expected in zip(results, ref, strict=True):
        probs = result["probabilities"]
        assert list(probs) == LABELS and sum(probs.values()) == pytest.approx(1, abs=1e-6)
        assert max(probs, key=probs.__getitem__) == LABELS[int(expected.argmax())]
    single = vision_client.post(
        "/v1/image-classification",
        json={"image": b64(files[0]), "labels": LABELS, "model": "tiny-clip"},
        headers=key,
    ).json()
    assert single == results[0]
    # Charged: the image's visual tokens and the label prompts' tokens.
    prompt_tokens = sum(len(torch_clip.tokenizer(p)["input_ids"]) for p in prompts)
    assert r.headers["x-tokens-used"] == str(4 * (17 + prompt_tokens))


def test_the_seed_example(vision_client: TestClient, key: dict[str, str]) -> None:
    body = {
        "image": b64(encode(picture(6), "JPEG")),
        "labels": ["healthy brain", "brain with tumor"],
        "model": "english",
    }
    r = vision_client.post("/image-classification", json=body, headers=key)
    assert r.status_code == 200, r.text
    assert list(r.json()) == ["probabilities"]
    assert set(r.json()["probabilities"]) == {"healthy brain", "brain with tumor"}
    assert r.headers["x-model"] == "tiny-clip"


def test_zero_shot_through_predict_for_an_image_and_a_text(
    vision_client: TestClient, key: dict[str, str], torch_clip: TorchClip
) -> None:
    data = encode(picture(5), "WEBP")
    r = vision_client.post(
        "/api/v1/models/tiny-clip/predict",
        json={"input": {"image": b64(data), "labels": LABELS}},
        headers=key,
    )
    assert r.status_code == 200, r.text
    out = r.json()["output"]
    ref = torch_clip.zero_shot(
        torch_clip.images([decoded(data)]), [f"a photo of a {label}." for label in LABELS]
    )[0]
    assert out["label"] == LABELS[int(ref.argmax())]
    assert out["score"] == pytest.approx(float(ref.max()), abs=0.1)
    text = "I am really mad because my product broke."
    r = vision_client.post(
        "/api/v1/models/tiny-clip/predict",
        json={"input": {"text": text, "labels": LABELS}},
        headers=key,
    )
    ref = torch_clip.zero_shot(torch_clip.texts([text]), LABELS)[0]  # texts: bare labels
    assert r.json()["output"]["label"] == LABELS[int(ref.argmax())]


def test_a_batch_may_mix_texts_and_images(vision_models: Path) -> None:
    folder = vision_models / "tiny-clip"
    manifest = read_manifest(folder)
    session = create_session(folder / manifest.files["model"].path, RuntimeConfig())
    runner = build_runner(folder, manifest, session)
    payloads: list[dict[str, Any]] = [
        {"text": "hello"},
        {"image": b64(encode(picture(1), "PNG"))},
        {"image": b64(encode(picture(2), "JPEG")), "labels": LABELS},
        {"text": "The meaning of life is 42.", "labels": LABELS[:2]},
        {"image": b64(encode(picture(3), "WEBP")), "labels": LABELS[::-1]},
    ]
    inputs = [runner.parse_input(p) for p in payloads]
    merged = runner.infer(runner.preprocess(inputs))
    assert [m.shape for m in merged] == [(16,), (16,), (4,), (2,), (4,)]
    for item, together in zip(inputs, merged, strict=True):
        alone = runner.infer(runner.preprocess([item]))[0]
        # Not bit-equal: dynamic INT8 scales activations per call, so batch mates shift them.
        if item.labels:
            assert together.argmax() == alone.argmax()
        else:
            assert cosine(together, alone) >= 0.999


def test_cached_answer_is_a_hit(vision_client: TestClient, key: dict[str, str]) -> None:
    body = {"image": b64(encode(picture(7), "PNG")), "model": "tiny-clip"}
    first = vision_client.post("/v1/image-vectorisation", json=body, headers=key)
    second = vision_client.post("/v1/image-vectorisation", json=body, headers=key)
    assert first.headers["x-cache"] == "MISS" and second.headers["x-cache"] == "HIT"
    assert first.json() == second.json() and second.headers["x-tokens-used"] == "0"


# ---- the image classifier ----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_image_classifier_matches_pytorch(
    vision_client: TestClient, key: dict[str, str], vision_checkpoints: dict[str, Path], fmt: str
) -> None:
    files = [encode(picture(seed, (50 + 7 * seed, 40)), fmt) for seed in range(5)]
    r = vision_client.post(
        "/v1/image-classification",
        json={"image": [b64(f) for f in files], "model": "tiny-vit"},
        headers=key,
    )
    assert r.status_code == 200, r.text
    ref = torch_vit(vision_checkpoints["vit"], [decoded(f) for f in files])
    for result, expected in zip(r.json(), ref, strict=True):
        probs = np.array([result["probabilities"][label] for label in VIT_LABELS])
        assert probs.argmax() == expected.argmax()
        assert np.abs(probs - expected).max() < 0.02
    assert r.headers["x-tokens-used"] == str(5 * 17)


def test_image_classifier_predict_and_label_subset(
    vision_client: TestClient, key: dict[str, str], vision_checkpoints: dict[str, Path]
) -> None:
    data = encode(picture(4), "PNG")
    r = vision_client.post(
        "/api/v1/models/tiny-vit/predict", json={"input": {"image": b64(data)}}, headers=key
    )
    assert r.status_code == 200, r.text
    out = r.json()["output"]
    ref = torch_vit(vision_checkpoints["vit"], [decoded(data)])[0]
    assert out["label"] == VIT_LABELS[int(ref.argmax())]
    assert set(out["probabilities"]) == set(VIT_LABELS)
    r = vision_client.post(
        "/image-classification",
        json={"image": b64(data), "labels": ["dog", "cat"], "model": "tiny-vit"},
        headers=key,
    )
    probs = r.json()["probabilities"]
    assert list(probs) == ["dog", "cat"] and sum(probs.values()) == pytest.approx(1)
    assert probs["dog"] / probs["cat"] == pytest.approx(ref[1] / ref[0], rel=0.05)


# ---- bad inputs --------------------------------------------------------------------------------


def png_b64(size: tuple[int, int] = (8, 8)) -> str:
    return b64(encode(Image.new("RGB", size), "PNG"))


def bomb(side: int = 7_000) -> str:
    """A few kilobytes of PNG that claim side x side pixels (over the 40 MP cap)."""
    return b64(encode(Image.new("1", (side, side)), "PNG"))


def truncated(fmt: str) -> str:
    data = encode(picture(0), fmt)
    return b64(data[: len(data) // 2])


CLIP_ONLY = {"model": "tiny-clip"}
# (path, body maker, words the message must hold); bodies are made lazily (the bomb is slow).
BAD_BODIES: list[tuple[str, Callable[[], dict[str, Any]], str]] = [
    ("/v1/image-vectorisation", lambda: {"image": "not base64 at all!"}, "base64"),
    ("/v1/image-vectorisation", lambda: {"image": b64(b"hello, world")}, "JPEG, PNG or WebP"),
    ("/v1/image-vectorisation", lambda: {"image": b64(encode(picture(0), "GIF"))}, "WebP"),
    ("/v1/image-vectorisation", lambda: {"image": truncated("PNG")}, "truncated"),
    ("/v1/image-vectorisation", lambda: {"image": truncated("JPEG")}, "truncated"),
    ("/v1/image-vectorisation", lambda: {"image": ""}, "empty"),
    ("/v1/image-vectorisation", lambda: {"image": "data:text/plain;base64,aGk="}, "data URL"),
    ("/v1/image-vectorisation", lambda: {"image": []}, "length >= 1"),
    ("/v1/image-vectorisation", lambda: {"image": 42}, "image"),
    ("/v1/image-vectorisation", lambda: {"image": bomb()}, "7000x7000 pixels"),
    ("/v1/image-vectorisation", lambda: {"image": png_b64(), "model": "tiny-vit"}, "needs"),
    ("/v1/image-classification", lambda: {"image": png_b64(), "labels": []}, "non-empty list"),
    ("/v1/image-classification", lambda: {"image": png_b64(), "labels": ["a", "a"]}, "distinct"),
    ("/v1/image-classification", lambda: {"image": png_b64(), "labels": ["a", " "]}, "non-empty"),
    ("/v1/image-classification", lambda: {"image": png_b64()}, "`labels` is required"),
    (
        "/v1/image-classification",
        lambda: {"image": png_b64(), "labels": ["cat", "zebra"], "model": "tiny-vit"},
        "zebra",
    ),
    (
        "/api/v1/models/tiny-clip/predict",
        lambda: {"input": {"image": png_b64(), "text": "x"}},
        "either",
    ),
    ("/api/v1/models/tiny-clip/predict", lambda: {"input": {"labels": ["a"]}}, "either"),
    ("/api/v1/models/tiny-vit/predict", lambda: {"input": {"image": "@@@"}}, "base64"),
]


@pytest.mark.parametrize(
    ("path", "make", "message"), [pytest.param(*b, id=b[2]) for b in BAD_BODIES]
)
def test_bad_inputs_are_422_with_a_message(
    vision_client: TestClient,
    key: dict[str, str],
    path: str,
    make: Callable[[], dict[str, Any]],
    message: str,
) -> None:
    body = make() if "predict" in path else {**CLIP_ONLY, **make()}
    r = vision_client.post(path, json=body, headers=key)
    assert r.status_code == 422, r.text
    error = r.json()
    assert error["code"] in {"VALIDATION_ERROR", "MODEL_TASK_MISMATCH"}
    assert message in error["message"]


def test_too_many_images_in_a_batch(serve: Callable[..., TestClient], vision_models: Path) -> None:
    client = serve(vision_models, APPLIANCE_SERVER__MAX_BATCH_ITEMS="2")
    headers = {"x-api-key": client.keys.create("k", ["predict"])[1]}  # type: ignore[attr-defined]
    r = client.post(
        "/v1/image-vectorisation",
        json={"image": [png_b64()] * 3, "model": "tiny-clip"},
        headers=headers,
    )
    assert r.status_code == 422 and "at most 2" in r.json()["message"]


def test_decoding_caps_bytes_and_pixels() -> None:
    data = b64(encode(picture(0, (40, 40)), "PNG"))
    with pytest.raises(ValidationFailed, match="at most 100"):
        decode_image(data, max_bytes=100)
    with pytest.raises(ValidationFailed, match="40x40 pixels"):
        decode_image(data, max_pixels=1000)
    with pytest.raises(ValidationFailed, match="too many pixels"):  # pillow's own bomb check
        decode_image(bomb(20_000), max_pixels=10**9)
    assert decode_image(data).size == (40, 40)
    urlsafe = data.replace("+", "-").replace("/", "_").rstrip("=")
    assert decode_image(urlsafe).tobytes() == decode_image(data).tobytes()


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert decode_image(b64(buffer.getvalue())).size == (20, 40)


def test_serving_modules_import_no_export_stack() -> None:
    code = (
        "import sys, appliance.tasks.clip, appliance.tasks.image, appliance.api.vision, "
        "appliance.runtime.images; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'torch', 'transformers', 'optimum'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_large_image_is_decoded_small_and_charged_by_pixels(
    vision_client: TestClient, key: dict[str, str], torch_clip: TorchClip
) -> None:
    # Reduced before the model's resize, the vector still matches PyTorch on the full image.
    data = encode(picture(2, (800, 600)), "JPEG")
    r = vision_client.post(
        "/v1/image-vectorisation", json={"image": b64(data), "model": "tiny-clip"}, headers=key
    )
    assert r.status_code == 200, r.text
    assert cosine(np.array(r.json()["vector"]), torch_clip.images([decoded(data)])[0]) >= 0.99
    # One token per 64x64 patch of the picture as sent: ceil(800 * 600 / 4096).
    assert r.headers["x-tokens-used"] == "118"


def test_reduced_decoding_matches_full_size_preprocessing() -> None:
    pre = ImagePreprocessor.from_config(
        {
            "resize": {"shortest_edge": 64},
            "center_crop": {"height": 64, "width": 64},
            "rescale_factor": 1 / 255,
        }
    )
    for fmt in ("PNG", "JPEG"):
        data = b64(encode(picture(3, (1600, 1200)), fmt))
        small = decode_image(data, min_side=pre.min_side)
        assert max(small.size) < 1600 // 2  # decoded (JPEG) or reduced (PNG) well below full size
        full = pre(decode_image(data))
        # A few grey levels apart at most, as pillow's reducing_gap promises.
        assert np.abs(pre(small) - full).mean() < 2 / 255


# Decoded in a fresh interpreter that only reads the file, so that its peak RSS (ru_maxrss)
# is that of the decode alone (building the picture would set the peak first).
MEASURE_DECODE = """
import json, resource, sys
from appliance.runtime.images import ImagePreprocessor, decode_sized
text = open(sys.argv[1]).read()
pre = ImagePreprocessor.from_config(
    {"resize": {"shortest_edge": 224}, "center_crop": {"height": 224, "width": 224}}
)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
decoded, size = decode_sized(text, min_side=pre.min_side)
pixels = pre(decoded)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"grown_kb": grown, "size": size, "shape": pixels.shape}))
"""


@pytest.mark.parametrize(
    "mode,colour,fmt,bound_mb",
    [
        # Grayscale: its one 40 MB decode buffer, reduced before it becomes RGB (before: the
        # buffer and a 160 MB RGB copy, +198 MB measured).
        ("L", 128, "PNG", 50),
        # Palette and 1-bit: converted a band of rows at a time (before: +198 MB measured).
        ("P", 3, "PNG", 75),
        ("1", 1, "PNG", 60),
        # JPEG: decoded at 1/8 scale straight from the DCT (before: +160 MB measured).
        ("RGB", (200, 30, 30), "JPEG", 25),
        # RGB PNG has no reduced decoding in pillow: one full decode buffer (4 bytes a pixel,
        # 160 MB at the 40 MP cap), never a converted copy on top of it.
        ("RGB", (200, 30, 30), "PNG", 175),
    ],
    ids=["png-40mp-gray", "png-40mp-palette", "png-40mp-1bit", "jpeg-40mp", "png-40mp-rgb"],
)
def test_a_40_megapixel_image_is_decoded_with_bounded_memory(
    tmp_path: Path, mode: str, colour: Any, fmt: str, bound_mb: int
) -> None:
    data = encode(Image.new(mode, (8000, 5000), colour), fmt)
    assert len(data) < 1024 * 1024  # a small file claiming a large canvas
    (tmp_path / "image.b64").write_text(b64(data))
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", MEASURE_DECODE, str(tmp_path / "image.b64")],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    measured = json.loads(result.stdout)
    assert measured["size"] == [8000, 5000] and measured["shape"] == [3, 224, 224]
    assert measured["grown_kb"] < bound_mb * 1024
