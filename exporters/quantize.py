"""Dynamic INT8 quantisation with optimum's ORTQuantizer, per-channel, preset by CPU, and a
search for the few layers worth keeping in fp32 when INT8 costs too much fidelity."""

from __future__ import annotations

import platform
import re
from pathlib import Path

import onnx

from appliance.models.manifest import Quantization

PRESETS = ("avx512_vnni", "avx512", "avx2", "arm64")
# Feed-forward output projections were measured to be the encoder's most INT8-sensitive
# weights (shared/TOOLCHAIN.md); they are the candidates the search may keep in fp32.
_FFN_OUTPUT = re.compile(r"/layers?\.\d+/(output/dense|mlp/down_proj|ffn/lin2)/MatMul$")


def cpu_preset() -> str:
    """The preset that suits this machine's CPU (the one the model will usually serve on)."""
    if platform.machine().lower() in {"aarch64", "arm64"}:
        return "arm64"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "avx2"
    for flag, preset in (("avx512_vnni", "avx512_vnni"), ("avx512f", "avx512")):
        if flag in flags:
            return preset
    return "avx2"


def sensitive_nodes(fp32_model: Path) -> list[str]:
    graph = onnx.load(str(fp32_model), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type == "MatMul" and _FFN_OUTPUT.search(n.name)]


def quantize(
    onnx_dir: Path, out_dir: Path, preset: str, exclude: list[str] | None = None
) -> tuple[Path, Quantization]:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    qconfig = getattr(AutoQuantizationConfig, preset)(
        is_static=False, per_channel=True, nodes_to_exclude=list(exclude or [])
    )
    if preset == "avx2":
        # QUInt8 weights (avx2's default) were measured much slower here than QInt8.
        from onnxruntime.quantization import QuantType

        qconfig.weights_dtype = QuantType.QInt8
    quantizer = ORTQuantizer.from_pretrained(onnx_dir, file_name="model.onnx")
    quantizer.quantize(save_dir=out_dir, quantization_config=qconfig)
    return out_dir / "model_quantized.onnx", Quantization(
        method="dynamic-int8",
        preset=preset,
        weight_type=qconfig.weights_dtype.name,
        per_channel=qconfig.per_channel,
        nodes_excluded=list(exclude or []),
    )


def to_fp16(onnx_dir: Path, out_dir: Path) -> tuple[Path, Quantization]:
    """fp16 weights and compute with fp32 inputs and outputs, for the CUDA provider."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    out_dir.mkdir(parents=True, exist_ok=True)
    model = convert_float_to_float16(onnx.load(str(onnx_dir / "model.onnx")), keep_io_types=True)
    target = out_dir / "model_fp16.onnx"
    onnx.save(model, str(target))
    return target, Quantization(
        method="fp16", preset="gpu", weight_type="float16", per_channel=False
    )
