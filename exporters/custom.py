"""custom: any ONNX model (a folder holding one .onnx file, or the file itself). Its inputs and
outputs are read from the graph and declared in the manifest; its weights are quantised to
INT8 (dynamic, per-channel) unless options["quantize"] is false, and the INT8 outputs are
checked against the original graph's on generated inputs."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from rich.console import Console

from appliance.models.manifest import Manifest, Quantization, Validation, file_entry, write_manifest
from exporters.checkpoint import ExportError
from exporters.package import install, library_versions
from exporters.validate import cosine_rows

ELEM_TYPES = {
    onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.DOUBLE: "float64", onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32", onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.BOOL: "bool", onnx.TensorProto.STRING: "string",
}  # fmt: skip


def _specs(values: Any) -> list[dict[str, Any]]:
    specs = []
    for v in values:
        t = v.type.tensor_type
        dtype = ELEM_TYPES.get(t.elem_type)
        if dtype is None:
            raise ExportError(
                f"input/output {v.name} has an unsupported element type {t.elem_type}"
            )
        shape = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "dynamic")
            for d in t.shape.dim
        ]
        specs.append({"name": v.name, "dtype": dtype, "shape": shape})
    return specs


def sample_inputs(specs: list[dict[str, Any]], seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic inputs of the declared types (batch 1, dynamic sizes 8)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for i, spec in enumerate(specs):
        shape = [
            d if isinstance(d, int) and d > 0 else (1 if j == 0 else 8)
            for j, d in enumerate(spec["shape"])
        ]
        dtype = spec["dtype"]
        if dtype.startswith("float"):
            feeds[spec["name"]] = rng.standard_normal(shape).astype(dtype)
        elif dtype == "bool":
            feeds[spec["name"]] = rng.integers(0, 2, shape).astype(bool)
        elif dtype == "string":
            feeds[spec["name"]] = np.full(shape, f"sample {i}", dtype=object)
        else:
            feeds[spec["name"]] = rng.integers(0, 10, shape).astype(dtype)
    return feeds


def _onnx_file(source: Path) -> Path:
    if source.is_file() and source.suffix == ".onnx":
        return source
    files = sorted(source.glob("*.onnx")) if source.is_dir() else []
    if len(files) != 1:
        raise ExportError(
            f"{source}: give an .onnx file or a folder holding exactly one (found {len(files)})"
        )
    return files[0]


def _outputs(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def export_custom(
    source: Path,
    *,
    out_dir: Path,
    slug: str,
    name: str | None,
    description: str,
    preset: str | None,
    force: bool,
    console: Console,
    options: dict[str, Any],
) -> Manifest:
    original = _onnx_file(source)
    graph = onnx.load(str(original), load_external_data=False).graph
    inputs, outputs = _specs(graph.input), _specs(graph.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".export-{slug}-", dir=out_dir))
    try:
        stage = work / "model"
        stage.mkdir()
        target = stage / "model.onnx"
        quantise = options.get("quantize", True) is not False
        if quantise:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(
                str(original),
                str(target),
                weight_type=QuantType.QInt8,
                per_channel=True,
                extra_options={"EnableSubgraph": True},
            )
        else:
            shutil.copyfile(original, target)
        feeds = sample_inputs(inputs)
        try:
            ref, ours = _outputs(original, feeds), _outputs(target, feeds)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ExportError(f"onnxruntime cannot run {original.name}: {exc}") from exc
        cos = [
            float(
                cosine_rows(
                    o.reshape(1, -1).astype(np.float64), r.reshape(1, -1).astype(np.float64)
                )[0]
            )
            if np.issubdtype(r.dtype, np.floating)
            else float(np.array_equal(o, r))
            for o, r in zip(ours, ref, strict=True)
        ]
        validation = Validation(
            samples=1,
            metrics={"min_cosine": min(cos)},
            thresholds={"min_cosine": 0.98},
            passed=min(cos) >= 0.98,
        )
        console.print(
            f"custom model {slug}: {len(inputs)} inputs, {len(outputs)} outputs; "
            f"min cosine {min(cos):.4f}"
        )
        if not validation.passed and not force:
            raise ExportError(
                f"INT8 outputs disagree with the original (min cosine {min(cos):.4f}); "
                "--force writes it"
            )
        example = {k: v.tolist() for k, v in feeds.items() if v.dtype != object}
        manifest = Manifest(
            slug=slug,
            code=slug.upper().replace("-", "_"),
            name=name or original.stem,
            task="custom",
            description=description,
            files={"model": file_entry(stage, "model.onnx")},
            inputs=[s["name"] for s in inputs],
            outputs=[s["name"] for s in outputs],
            max_tokens=0,
            example_payload=example if len(example) == len(inputs) else {},
            config={"inputs": inputs, "outputs": outputs},
            quantization=Quantization(
                method="dynamic-int8" if quantise else "none", preset="", per_channel=quantise
            ),
            sizes={"fp32_bytes": original.stat().st_size, "int8_bytes": target.stat().st_size},
            validation=validation,
            exporter={"libraries": library_versions()},
            source=str(original.resolve()),
        )
        write_manifest(stage, manifest)
        install(stage, out_dir / slug)
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)
