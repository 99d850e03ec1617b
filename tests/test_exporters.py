"""The exporter: INT8 ONNX, manifest contents, fidelity recorded, refusal below the threshold."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from appliance.models.manifest import read_manifest, sha256_file, verify
from exporters.checkpoint import ExportError
from exporters.export import export_model


def test_manifest_describes_the_model(models_dir: Path, checkpoints: dict[str, Path]) -> None:
    folder = models_dir / "tiny-cls"
    m = read_manifest(folder)
    verify(folder, m)
    assert m.slug == "tiny-cls" and m.task == "text-classification"
    assert m.labels == ["ham", "spam"] and m.multi_label is False
    assert m.max_tokens == 64
    assert m.files["model"].sha256 == sha256_file(folder / "model.onnx")
    assert m.quantization.weight_type == "QInt8" and m.quantization.per_channel
    assert m.sizes["int8_bytes"] < m.sizes["fp32_bytes"]
    assert m.validation is not None and m.validation.passed
    assert m.validation.metrics["argmax_agreement"] >= 0.9
    assert m.validation.samples >= 10
    assert {"torch", "transformers", "optimum", "onnxruntime"} <= set(m.exporter["libraries"])
    assert m.source == str(checkpoints["tiny-cls"].resolve())
    assert read_manifest(models_dir / "tiny-tags").multi_label is True


def test_embedding_manifest_has_pooling_and_dimension(models_dir: Path) -> None:
    m = read_manifest(models_dir / "tiny-embed")
    assert (m.dimension, m.pooling, m.normalize) == (32, "mean", True)
    assert m.validation is not None and m.validation.metrics["min_cosine"] >= 0.99


def test_the_model_file_is_really_int8(models_dir: Path) -> None:
    graph = onnx.load(str(models_dir / "tiny-embed" / "model.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"}
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert int8_weights


def test_the_served_graph_is_already_optimised(models_dir: Path, tmp_path: Path) -> None:
    """onnxruntime's fusions were applied at export (servers skip them at start): the file
    holds its fused contrib ops, and optimising it again finds nothing left to fuse."""
    import onnxruntime as ort

    path = models_dir / "tiny-embed" / "model.onnx"
    graph = onnx.load(str(path)).graph
    assert any(n.domain == "com.microsoft" for n in graph.node)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    again = tmp_path / "again.onnx"
    options.optimized_model_filepath = str(again)
    ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    assert len(onnx.load(str(again)).graph.node) == len(graph.node)


def test_export_below_the_threshold_writes_nothing(
    tmp_path: Path, checkpoints: dict[str, Path]
) -> None:
    with pytest.raises(ExportError, match="disagrees"):
        export_model(
            checkpoints["tiny-embed"],
            "feature-extraction",
            out_dir=tmp_path,
            slug="x",
            min_cosine=1.01,
        )
    assert [p.name for p in tmp_path.iterdir()] == []


def test_force_writes_a_failing_model_and_says_so(
    tmp_path: Path, checkpoints: dict[str, Path]
) -> None:
    m = export_model(
        checkpoints["tiny-embed"],
        "feature-extraction",
        out_dir=tmp_path,
        slug="forced",
        min_cosine=1.01,
        force=True,
    )
    assert m.validation is not None and m.validation.passed is False
    assert read_manifest(tmp_path / "forced").validation.passed is False  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "source,task,message",
    [
        ("missing", "feature-extraction", "not a folder"),
        ("empty", "feature-extraction", "no config.json"),
        ("tiny-embed", "translation", "not supported"),
    ],
)
def test_clear_errors(
    tmp_path: Path, checkpoints: dict[str, Path], source: str, task: str, message: str
) -> None:
    (tmp_path / "empty").mkdir()
    path = checkpoints.get(source, tmp_path / source)
    with pytest.raises(ExportError, match=message):
        export_model(path, task, out_dir=tmp_path / "out", slug="x")


def test_reexport_replaces_the_folder_whole(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    first = export_model(
        checkpoints["tiny-embed"], "feature-extraction", out_dir=tmp_path, slug="e"
    )
    (tmp_path / "e" / "leftover.txt").write_text("from the old export")
    second = export_model(
        checkpoints["tiny-embed"], "feature-extraction", out_dir=tmp_path, slug="e"
    )
    assert not (tmp_path / "e" / "leftover.txt").exists()
    assert second.files["model"].sha256 == first.files["model"].sha256  # deterministic
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def test_fp16_export_for_gpu_serving(tmp_path: Path, checkpoints: dict[str, Path], serve) -> None:  # type: ignore[no-untyped-def]
    m = export_model(
        checkpoints["tiny-embed"],
        "feature-extraction",
        out_dir=tmp_path,
        slug="half",
        precision="fp16",
    )
    assert m.quantization.method == "fp16" and m.validation is not None and m.validation.passed
    graph = onnx.load(str(tmp_path / "half" / "model.onnx")).graph
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
    # It still serves (here on the CPU provider: the config's CUDA provider falls back).
    client = serve(
        tmp_path, APPLIANCE_RUNTIME__PROVIDERS='["CUDAExecutionProvider", "CPUExecutionProvider"]'
    )
    key = client.keys.create("k", ["predict"])[1]
    r = client.post(
        "/v1/text-vectorisation", json={"text": "hi", "model": "half"}, headers={"x-api-key": key}
    )
    assert r.status_code == 200 and len(r.json()["vector"]) == 32
