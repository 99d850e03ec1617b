"""Assemble the model folder (INT8 ONNX, tokenizer.json, manifest) and install it atomically."""

from __future__ import annotations

import contextlib
import importlib.metadata
import shutil
from datetime import datetime, timezone
from pathlib import Path

from appliance import __version__
from appliance.models.manifest import Manifest, Quantization, file_entry, install_folder
from exporters.checkpoint import CheckpointInfo
from exporters.tasks import TaskSpec

LIBRARIES = (
    "torch",
    "transformers",
    "optimum",
    "optimum-onnx",
    "onnx",
    "onnxruntime",
    "tokenizers",
)


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def pad_token_id(tokenizer_json: Path, config: dict[str, object]) -> int:
    import json

    data = json.loads(tokenizer_json.read_text())
    padding = data.get("padding") or {}
    if isinstance(padding.get("pad_id"), int):
        return int(padding["pad_id"])
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    for token in ("[PAD]", "<pad>", "<|padding|>"):
        if (tid := tok.token_to_id(token)) is not None:
            return tid
    pad = config.get("pad_token_id")
    return pad if isinstance(pad, int) else 0


def place_model(model: Path, dst: Path, quantization: Quantization) -> None:
    """Write the served model file: the INT8 graph with onnxruntime's portable graph
    optimisations (fusions, constant folding: level EXTENDED) already applied, so a server
    does not redo them at every start. Measured: session creation 0.10 -> 0.075 s for
    all-MiniLM-L6-v2. The hardware-specific layout passes (level ALL) still run at load, and
    validation runs on this very file. fp16 exports are for GPUs: copied as they are."""
    if quantization.method == "fp16":
        shutil.copyfile(model, dst)
        return
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])


def stage(
    stage_dir: Path,
    *,
    slug: str,
    name: str | None,
    description: str,
    spec: TaskSpec,
    info: CheckpointInfo,
    int8_model: Path,
    fp32_model: Path,
    tokenizer_json: Path,
    quantization: Quantization,
    inputs: list[str],
    outputs: list[str],
) -> Manifest:
    stage_dir.mkdir(parents=True)
    place_model(int8_model, stage_dir / "model.onnx", quantization)
    shutil.copyfile(tokenizer_json, stage_dir / "tokenizer.json")
    return Manifest(
        slug=slug,
        code=slug.upper().replace("-", "_").replace(".", "_"),
        name=name or info.name,
        description=description,
        task=spec.name,
        files={
            "model": file_entry(stage_dir, "model.onnx"),
            "tokenizer": file_entry(stage_dir, "tokenizer.json"),
        },
        inputs=inputs,
        outputs=outputs,
        max_tokens=info.max_tokens,
        pad_token_id=pad_token_id(tokenizer_json, info.config),
        labels=info.labels,
        multi_label=info.multi_label,
        dimension=info.dimension,
        pooling=info.pooling if spec.name == "feature-extraction" else None,
        normalize=info.normalize if spec.name == "feature-extraction" else False,
        example_payload=dict(spec.example_payload),
        quantization=quantization,
        sizes={
            "fp32_bytes": fp32_model.stat().st_size,
            "int8_bytes": (stage_dir / "model.onnx").stat().st_size,
        },
        exporter={"appliance": __version__, "libraries": library_versions()},
        source=str(info.folder.resolve()),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def swap_model(
    stage_dir: Path, manifest: Manifest, int8_model: Path, quantization: Quantization
) -> None:
    """Put another INT8 candidate in the staged folder and update the manifest to match."""
    place_model(int8_model, stage_dir / "model.onnx", quantization)
    manifest.files["model"] = file_entry(stage_dir, "model.onnx")
    manifest.sizes["int8_bytes"] = manifest.files["model"].size
    manifest.quantization = quantization


install = install_folder
