"""The text-generation export pipeline for decoder-only models (GPT-2, Llama, ...):

read the checkpoint (or a GGUF file, dequantised by transformers) -> ONNX with past key values
(optimum, offline) -> the PyTorch reference (greedy tokens and decode speed) -> quantise with
each candidate scheme and measure it through the appliance's own runner -> keep the fastest
scheme by the rule in _choose (fidelity up to a target first, then speed) -> install atomically.

Why a search: activation quantisation that suits encoders wrecks a small decoder (shared/
TOOLCHAIN.md: dynamic INT8 kept 1 of 80 greedy tokens of SmolLM2, weight-only 8-bit kept
67), while on other models dynamic INT8 is fine and faster. So each model is measured.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console

from appliance import __version__
from appliance.config import RuntimeConfig
from appliance.models.manifest import (
    Manifest,
    Quantization,
    Validation,
    file_entry,
    write_manifest,
)
from exporters.checkpoint import ExportError, read_config, read_json
from exporters.export import Progress, onnx_export
from exporters.package import install, library_versions
from exporters.quantize import cpu_preset, quantize

__all__ = ["SCHEMES", "export_generation"]

OPTIMUM_TASK = "text-generation-with-past"
STEPS = 5
PROMPTS = (
    "The capital of France is",
    "Once upon a time, there was a",
    "def fibonacci(n):",
    "The best way to learn a new language is",
    "Water boils at",
    "Water boils at a temperature of",
    "In the morning, the old fisherman",
    "The three primary colours are",
)
"""Fixed prompts for the fidelity check (greedy continuation compared with PyTorch)."""
NEW_TOKENS = 16
MIN_AGREEMENT = 0.5
"""Share of greedy tokens that must match PyTorch before the first difference for a scheme to
be written at all (the rule in _choose aims at TARGET_AGREEMENT). One early flip to an equally
good word costs a whole prompt, so this is not near 1: on SmolLM2 weight-only 8-bit kept 0.73
(int8 compute) to 0.88 (fp32 compute), coherent and right; dynamic INT8 kept 0.16 ("The
capital of France is a French-speaking country"), 0.34 with its most sensitive layers in fp32."""
MAX_NEW_TOKENS = 1024
EXAMPLE = {"text": "Geralt knew the signs, the monster was a", "max_length": 20}
SINGLE_FILE_LIMIT = 1_900_000_000
"""protobuf cannot hold 2 GB: larger models keep their weights in model.onnx_data."""
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


# ---- candidate quantisation schemes ----------------------------------------------------------


def _attention_matmuls(fp32: Path) -> list[str]:
    """MatMuls of two activations (attention scores and mixing, rotary): not weights, and
    quantising them on the fly costs a decoder most of its fidelity."""
    import onnx

    graph = onnx.load(str(fp32), load_external_data=False).graph
    constants = {i.name for i in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return [
        n.name
        for n in graph.node
        if n.op_type == "MatMul" and not any(i in constants for i in n.input)
    ]


def _sensitive_matmuls(fp32: Path) -> list[str]:
    import onnx

    graph = onnx.load(str(fp32), load_external_data=False).graph
    pattern = re.compile(r"(down_proj|mlp/c_proj|lm_head)/MatMul$")
    return [n.name for n in graph.node if n.op_type == "MatMul" and pattern.search(n.name)]


def _dynamic(fp32_dir: Path, out: Path, preset: str) -> tuple[Path, Quantization]:
    path, quant = quantize(fp32_dir, out, preset)
    quant.method = "dynamic-int8"
    return path, quant


def _dynamic_keep_sensitive(fp32_dir: Path, out: Path, preset: str) -> tuple[Path, Quantization]:
    fp32 = fp32_dir / "model.onnx"
    keep = _attention_matmuls(fp32) + _sensitive_matmuls(fp32)
    path, quant = quantize(fp32_dir, out, preset, exclude=keep)
    quant.method = "dynamic-int8-keep-sensitive"
    return path, quant


Quantiser = Callable[[Path, Path, str], tuple[Path, Quantization]]
"""(fp32 ONNX folder, output folder, CPU preset) -> (quantised model, how)."""


def _weight_only(accuracy_level: int | None) -> Quantiser:
    def run(fp32_dir: Path, out: Path, preset: str) -> tuple[Path, Quantization]:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        model = onnx.load(str(fp32_dir / "model.onnx"))
        quantizer = MatMulNBitsQuantizer(
            model, bits=8, block_size=32, is_symmetric=True, accuracy_level=accuracy_level
        )
        quantizer.process()
        out.mkdir(parents=True, exist_ok=True)
        path = out / "model.onnx"
        _save(quantizer.model.model, path)
        suffix = f"-acc{accuracy_level}" if accuracy_level else ""
        return path, Quantization(
            method=f"weight-only-int8{suffix}",
            preset=f"matmul-nbits-block32-symmetric{suffix}",
            weight_type="int8",
            per_channel=False,
        )

    return run


_LAYER = re.compile(r"/(?:layers|h|blocks)\.(\d+)/")


def _first_layers_matmuls(fp32: Path, count: int) -> list[str]:
    """The MatMuls of the first `count` decoder layers (Llama `layers.N`, GPT-2 `h.N`)."""
    import onnx

    graph = onnx.load(str(fp32), load_external_data=False).graph
    return [
        n.name
        for n in graph.node
        if n.op_type == "MatMul" and (m := _LAYER.search(n.name)) and int(m.group(1)) < count
    ]


def _weight_only_first_exact(count: int) -> Quantiser:
    """Weight-only 8-bit computing in int8 (accuracy_level 4), except the first `count` decoder
    layers, which compute in fp32 from their 8-bit weights (accuracy_level 0). Their error
    goes through every later layer: on SmolLM2 the first two alone took greedy agreement from
    0.73 to 0.85 at 56 tokens/s (fp32 compute everywhere: 0.88 at 16; the last two layers, or
    the down-projections, in fp32: no gain)."""

    def run(fp32_dir: Path, out: Path, preset: str) -> tuple[Path, Quantization]:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        exact = _first_layers_matmuls(fp32_dir / "model.onnx", count)
        if not exact:
            raise ExportError("no decoder layer names (layers.N / h.N) found in the graph")
        common = {"bits": 8, "block_size": 32, "is_symmetric": True}
        fast = MatMulNBitsQuantizer(
            onnx.load(str(fp32_dir / "model.onnx")),
            accuracy_level=4,
            nodes_to_exclude=exact,
            **common,  # type: ignore[arg-type]
        )
        fast.process()
        rest = MatMulNBitsQuantizer(
            fast.model.model,
            accuracy_level=0,
            nodes_to_include=exact,
            **common,  # type: ignore[arg-type]
        )
        rest.process()
        out.mkdir(parents=True, exist_ok=True)
        path = out / "model.onnx"
        _save(rest.model.model, path)
        return path, Quantization(
            method=f"weight-only-int8-acc4-first{count}-acc0",
            preset=f"matmul-nbits-block32-symmetric-acc4-first{count}-acc0",
            weight_type="int8",
            per_channel=False,
        )

    return run


SCHEMES: dict[str, Quantiser] = {
    "dynamic-int8": _dynamic,
    "dynamic-int8-keep-sensitive": _dynamic_keep_sensitive,
    "weight-only-int8": _weight_only(None),
    "weight-only-int8-acc4": _weight_only(4),
    "weight-only-int8-acc4-first1-acc0": _weight_only_first_exact(1),
    "weight-only-int8-acc4-first2-acc0": _weight_only_first_exact(2),
    "weight-only-int8-acc4-first4-acc0": _weight_only_first_exact(4),
}
"""Candidate schemes: dynamic INT8 (weights and activations, per-channel QInt8); the same with
attention, down-projections and the LM head kept in fp32; weight-only 8-bit MatMulNBits
(block 32, symmetric) computing in fp32, or in int8 (accuracy_level 4, faster), or in int8 but
for the first 1, 2 or 4 decoder layers in fp32."""


def _save(model: Any, path: Path) -> None:
    import onnx

    if model.ByteSize() < SINGLE_FILE_LIMIT:
        onnx.save(model, str(path))
    else:
        onnx.save(model, str(path), save_as_external_data=True, location=path.name + "_data")


_ELEMENTWISE = {"Add", "Cast", "Div", "Identity", "Mul", "Tanh"}
"""Ops that may sit between the LM head's MatMul and `logits` (bias, dtype, soft-capping):
they act per position, so slicing before them changes nothing but the sequence length."""


def _last_position_logits(path: Path) -> bool:
    """Rewrite the graph so `logits` holds only the last fed position: the LM head gets the
    last position's hidden state instead of every position's. Prefilling a long prompt then
    computes one row of vocabulary logits instead of one per prompt token (6,000 x 49,152
    floats, 1.2 GB, for SmolLM2) -- the appliance only ever reads the last. False (graph left
    as it was, the runner still reads [:, -1]) when the head is not the plain MatMul on a
    [batch, sequence, hidden] tensor this expects."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    node = producer.get("logits")
    for _ in range(len(_ELEMENTWISE) + 1):
        if node is None or node.op_type == "MatMul":
            break
        node = producer.get(node.input[0]) if node.op_type in _ELEMENTWISE else None
    if node is None or node.op_type != "MatMul":
        return False
    hidden = node.input[0]
    name = "appliance_last_position"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{name}_starts"),
            numpy_helper.from_array(
                np.array([np.iinfo(np.int64).max], dtype=np.int64), f"{name}_ends"
            ),
            numpy_helper.from_array(np.array([1], dtype=np.int64), f"{name}_axes"),
        ]
    )
    sliced = f"{name}_hidden"
    at = list(graph.node).index(node)
    graph.node.insert(
        at,
        helper.make_node(
            "Slice",
            [hidden, f"{name}_starts", f"{name}_ends", f"{name}_axes"],
            [sliced],
            name=f"/{name}/Slice",
        ),
    )
    node.input[0] = sliced
    for output in graph.output:
        if output.name == "logits":
            dim = output.type.tensor_type.shape.dim[1]
            dim.Clear()
            dim.dim_value = 1
    # Only the graph file is rewritten: initializers stored outside it keep their references.
    onnx.save(model, str(path))
    return True


def _has_external_data(path: Path) -> bool:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)


def _place(model: Path, stage_dir: Path) -> list[str]:
    """Put a model in the staged folder as model.onnx + model.onnx_data; returns the files.

    The weights always go to model.onnx_data, whatever the size: onnxruntime memory-maps an
    external data file instead of copying the weights out of the protobuf, so the pages are
    file-backed and only the rows of the token-embedding table in use become resident.
    Measured on SmolLM2-135M (weight-only 8-bit, fp32 embeddings): serving RSS 416 vs 642 MB
    at ready, peak 481 vs 731 MB, same tokens, same speed."""
    import onnx

    for old in ("model.onnx", "model.onnx_data"):
        (stage_dir / old).unlink(missing_ok=True)
    onnx.save(
        onnx.load(str(model)),
        str(stage_dir / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx_data",
    )
    # onnx creates the data file 0600; the folder's other files are 0644 (bundles, uploads).
    (stage_dir / "model.onnx_data").chmod(0o644)
    return [n for n in ("model.onnx", "model.onnx_data") if (stage_dir / n).is_file()]


# ---- reading the checkpoint ------------------------------------------------------------------


def _from_gguf(source: Path, gguf_file: str, work: Path) -> Path:
    """Dequantise a GGUF file with transformers and save it as a normal checkpoint folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (source / gguf_file).is_file():
        raise ExportError(f"{source / gguf_file} does not exist.")
    try:
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    except (ImportError, ValueError, KeyError, OSError) as exc:
        raise ExportError(f"transformers could not read {gguf_file}: {exc}") from exc
    # The weights are dequantised to fp32 now; the marker would make optimum refuse them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder = work / "checkpoint"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _ids(*values: Any) -> list[int]:
    out: list[int] = []
    for value in values:
        items = value if isinstance(value, list) else [value]
        out += [int(v) for v in items if isinstance(v, int) and int(v) not in out]
    return out


@dataclass
class Checkpoint:
    folder: Path
    config: dict[str, Any]
    name: str
    eos_token_ids: list[int]
    bos_token_id: int | None
    pad_token_id: int
    max_positions: int


def _inspect(folder: Path) -> Checkpoint:
    config = read_config(folder)
    if config.get("is_encoder_decoder"):
        raise ExportError(
            f"{folder} is an encoder-decoder model: export it as summarisation, not "
            "text-generation (decoder-only models)."
        )
    generation = read_json(folder / "generation_config.json")
    eos = _ids(generation.get("eos_token_id"), config.get("eos_token_id"))
    bos = generation.get("bos_token_id", config.get("bos_token_id"))
    pad = _ids(generation.get("pad_token_id"), config.get("pad_token_id"), eos)
    positions = [
        config.get(k) for k in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")
    ]
    max_positions = next((int(p) for p in positions if isinstance(p, int) and p > 0), 2048)
    return Checkpoint(
        folder=folder,
        config=config,
        name=str(config.get("_name_or_path") or folder.name) or folder.name,
        eos_token_ids=eos,
        bos_token_id=int(bos) if isinstance(bos, int) else None,
        pad_token_id=pad[0] if pad else 0,
        max_positions=max_positions,
    )


def _tokenizer_json(folder: Path, work: Path) -> Path:
    if (folder / "tokenizer.json").is_file():
        return folder / "tokenizer.json"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, use_fast=True)
    if not getattr(tok, "is_fast", False):
        raise ExportError(f"{folder} has no tokenizer.json and its tokenizer cannot be converted.")
    path = work / "tokenizer.json"
    tok.backend_tokenizer.save(str(path))
    return path


def _graph_config(model: Path, ckpt: Checkpoint) -> dict[str, Any]:
    """What the runner needs to drive the graph, checked against the layout it supports."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    inputs = {i.name: i for i in graph.input}
    outputs = [o.name for o in graph.output]
    past = sorted(
        (n for n in inputs if _PAST.match(n)),
        key=lambda n: (int(_PAST.match(n).group(1)), n.endswith("value")),  # type: ignore[union-attr]
    )
    missing = {"input_ids", "attention_mask"} - set(inputs)
    if missing or not past or "logits" not in outputs:
        raise ExportError(
            "the ONNX graph does not have the decoder layout this appliance runs (input_ids, "
            "attention_mask, past_key_values.N.key/value -> logits, present.N.key/value)."
        )
    dims = [d.dim_value for d in inputs[past[0]].type.tensor_type.shape.dim]
    if len(dims) != 4 or not dims[1] or not dims[3]:
        raise ExportError(
            f"past key values of shape {dims} are not [batch, heads, length, head_dim]: "
            "this architecture's cache layout is not supported."
        )
    present = [n.replace("past_key_values", "present") for n in past]
    if not set(present) <= set(outputs):
        raise ExportError("the ONNX graph's present.N outputs do not match its past inputs.")
    cfg = ckpt.config
    layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    heads = cfg.get("num_attention_heads", cfg.get("n_head"))
    return {
        "model_type": cfg.get("model_type"),
        "eos_token_ids": ckpt.eos_token_ids,
        "bos_token_id": ckpt.bos_token_id,
        "pad_token_id": ckpt.pad_token_id,
        "num_layers": int(layers) if isinstance(layers, int) else len(past) // 2,
        "num_attention_heads": heads,
        "num_kv_heads": dims[1],
        "head_dim": dims[3],
        "vocab_size": cfg.get("vocab_size"),
        "max_positions": ckpt.max_positions,
        "max_new_tokens": min(MAX_NEW_TOKENS, ckpt.max_positions - 1),
        "past_inputs": past,
        "present_outputs": present,
        "position_ids": "position_ids" in inputs,
    }


# ---- measuring -------------------------------------------------------------------------------


@dataclass
class Reference:
    tokens: list[list[int]]
    tokens_per_second: float


def _torch_reference(folder: Path, new_tokens: int) -> Reference:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.generation_config.eos_token_id

    def generate(prompt: str, n: int) -> list[int]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
            )
        return [int(t) for t in out[0, ids.shape[1] :]]

    generate(PROMPTS[0], 2)  # warm-up
    start = time.perf_counter()
    tokens = [generate(p, new_tokens) for p in PROMPTS]
    took = time.perf_counter() - start
    return Reference(tokens, sum(map(len, tokens)) / took)


def prefix_agreement(ours: list[list[int]], reference: list[list[int]]) -> float:
    """Tokens agreeing before the first difference, over all reference tokens."""
    agreed = 0
    for a, b in zip(ours, reference, strict=True):
        for x, y in zip(a, b, strict=False):
            if x != y:
                break
            agreed += 1
    return agreed / max(1, sum(map(len, reference)))


@dataclass
class Trial:
    scheme: str
    agreement: float = 0.0
    tokens_per_second: float = 0.0
    size_bytes: int = 0
    sample: str = ""
    error: str = ""
    path: Path | None = None
    quantization: Quantization | None = None

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("path")
        out.pop("quantization")
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items() if v != ""}


def _appliance_run(
    stage_dir: Path, manifest: Manifest, new_tokens: int
) -> tuple[list[list[int]], float, str]:
    """Greedy continuations of PROMPTS by the appliance's own runner, and its decode speed."""
    from appliance.runtime.session import create_session
    from appliance.tasks.generate import GenerationRunner

    session = create_session(stage_dir / "model.onnx", RuntimeConfig(), arena=True)
    runner = GenerationRunner(stage_dir, manifest, session)
    runner.warmup()
    n = new_tokens
    inputs = [
        runner.parse_input({"text": p, "min_length": n, "max_length": n, "temperature": 0})
        for p in PROMPTS
    ]
    items = runner.preprocess(inputs)
    start = time.perf_counter()
    tokens = [runner.infer([item])[0][0] for item in items]
    took = time.perf_counter() - start
    sample = runner.postprocess(items[0], [tokens[0]]).output["output"]
    return tokens, sum(map(len, tokens)) / took, str(sample)


# ---- the pipeline ----------------------------------------------------------------------------


TARGET_AGREEMENT = 0.85
TARGET_SPEEDUP = 2.0


def _choose(trials: list[Trial], torch_speed: float, min_agreement: float) -> Trial | None:
    """The rule: fidelity up to the target first, then speed.
    1. agreement >= TARGET_AGREEMENT and >= TARGET_SPEEDUP x PyTorch's tokens/s: the fastest;
    2. else agreement >= TARGET_AGREEMENT and faster than PyTorch: the fastest;
    3. else faster than PyTorch (and >= min_agreement): the most faithful;
    4. else (>= min_agreement): the most faithful. None passes min_agreement: None."""
    good = [t for t in trials if not t.error and t.agreement >= min_agreement]
    faithful = [t for t in good if t.agreement >= TARGET_AGREEMENT]
    for pool in (
        [t for t in faithful if t.tokens_per_second >= TARGET_SPEEDUP * torch_speed],
        [t for t in faithful if t.tokens_per_second > torch_speed],
    ):
        if pool:
            return max(pool, key=lambda t: t.tokens_per_second)
    pool = [t for t in good if t.tokens_per_second > torch_speed] or good
    return max(pool, key=lambda t: (t.agreement, t.tokens_per_second)) if pool else None


def pick_scheme(
    trials: list[Trial],
    torch_speed: float,
    min_agreement: float,
    *,
    force: bool,
    console: Console,
    what: str = "generation",
) -> tuple[Trial, bool]:
    """The scheme to ship and whether it passed: the fastest faithful one; with `force`, the
    most faithful measured one when none passes; otherwise an ExportError that says why."""
    chosen = _choose(trials, torch_speed, min_agreement)
    if chosen is None:
        measured = [t for t in trials if not t.error]
        report = ", ".join(f"{t.scheme} {t.agreement:.2f}" for t in measured)
        if not force or not measured:
            raise ExportError(
                f"no INT8 scheme keeps greedy {what} close enough to PyTorch "
                f"(agreement {report or 'none measured'}; need {min_agreement}). "
                "Nothing was written; --force writes the most faithful one anyway."
            )
        return max(measured, key=lambda t: (t.agreement, t.tokens_per_second)), False
    if chosen.tokens_per_second <= torch_speed:
        console.print(
            f"[yellow]no scheme beat PyTorch fp32 decode speed here ({torch_speed:.1f} "
            "tokens/s); keeping the fastest faithful one[/yellow]"
        )
    return chosen, True


def _versions() -> dict[str, str]:
    versions = library_versions()
    for extra in ("gguf", "onnx-ir"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[extra] = importlib.metadata.version(extra)
    return versions


def export_generation(
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
    """Export a decoder-only checkpoint for text-generation (see the module docstring).

    options: gguf_file (a GGUF file in `source` to read instead of a checkpoint),
    schemes (candidate names from SCHEMES, default all), min_agreement (default 0.5),
    new_tokens (greedy tokens per prompt in the fidelity check, default 16)."""
    schemes = list(options.get("schemes") or SCHEMES)
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        raise ExportError(f"unknown schemes {unknown}; choose from {', '.join(SCHEMES)}")
    min_agreement = float(options.get("min_agreement", MIN_AGREEMENT))
    new_tokens = int(options.get("new_tokens", NEW_TOKENS))
    gguf_file = options.get("gguf_file")
    progress = Progress(console, STEPS)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".export-{slug}-", dir=out_dir))
    try:
        with progress("reading checkpoint" + (f" (GGUF {gguf_file})" if gguf_file else "")):
            folder = _from_gguf(source, str(gguf_file), work) if gguf_file else source
            ckpt = _inspect(folder)
            tokenizer_json = _tokenizer_json(folder, work)
        with progress(f"exporting to ONNX ({OPTIMUM_TASK})"):
            onnx_export(folder, OPTIMUM_TASK, work / "fp32", what="text-generation")
            fp32 = work / "fp32" / "model.onnx"
            last_only = _last_position_logits(fp32)
            graph_config = _graph_config(fp32, ckpt)
            graph_config["last_position_logits"] = last_only
        with progress("PyTorch fp32 reference (greedy tokens, decode speed)"):
            reference = _torch_reference(folder, new_tokens)

        stage_dir = work / "model"
        stage_dir.mkdir()
        shutil.copyfile(tokenizer_json, stage_dir / "tokenizer.json")
        fp32_bytes = sum(p.stat().st_size for p in (work / "fp32").glob("model.onnx*"))
        manifest = Manifest(
            slug=slug,
            code=slug.upper().replace("-", "_").replace(".", "_"),
            name=name or ckpt.name,
            description=description,
            task="text-generation",
            files={"tokenizer": file_entry(stage_dir, "tokenizer.json")},
            inputs=[],
            outputs=[],
            max_tokens=ckpt.max_positions,
            pad_token_id=ckpt.pad_token_id,
            example_payload=dict(EXAMPLE),
            config=graph_config,
            exporter={"appliance": __version__, "libraries": _versions()},
            source=str((source / gguf_file) if gguf_file else source.resolve()),
        )

        preset = preset or cpu_preset()
        trials: list[Trial] = []
        with progress(f"quantising and measuring {len(schemes)} scheme(s)"):
            for scheme in schemes:
                trial = Trial(scheme)
                trials.append(trial)
                try:
                    path, quant = SCHEMES[scheme](work / "fp32", work / scheme, preset)
                    _place(path, stage_dir)
                    trial.size_bytes = sum(p.stat().st_size for p in stage_dir.glob("model.onnx*"))
                    ours, speed, trial.sample = _appliance_run(stage_dir, manifest, new_tokens)
                except Exception as exc:  # a scheme the graph cannot take is just not chosen
                    trial.error = f"{type(exc).__name__}: {exc}"[:300]
                    console.print(f"  {scheme}: failed ({trial.error})")
                    continue
                trial.path, trial.quantization = path, quant
                trial.agreement = prefix_agreement(ours, reference.tokens)
                trial.tokens_per_second = speed
                console.print(
                    f"  {scheme}: greedy agreement {trial.agreement:.2f}, "
                    f"{speed:.1f} tokens/s (PyTorch fp32 {reference.tokens_per_second:.1f}), "
                    f"{trial.size_bytes / 1e6:.1f} MB"
                )

        chosen, passed = pick_scheme(
            trials, reference.tokens_per_second, min_agreement, force=force, console=console
        )

        with progress(f"packaging ({chosen.scheme})"):
            import onnx

            assert chosen.path is not None and chosen.quantization is not None
            files = _place(chosen.path, stage_dir)
            graph = onnx.load(str(stage_dir / "model.onnx"), load_external_data=False).graph
            manifest.inputs = [i.name for i in graph.input]
            manifest.outputs = [o.name for o in graph.output]
            manifest.files["model"] = file_entry(stage_dir, "model.onnx")
            if "model.onnx_data" in files:
                manifest.files["model_data"] = file_entry(stage_dir, "model.onnx_data")
            manifest.quantization = chosen.quantization
            manifest.sizes = {"fp32_bytes": fp32_bytes, "int8_bytes": chosen.size_bytes}
            manifest.validation = Validation(
                samples=len(PROMPTS),
                metrics={
                    "greedy_agreement": chosen.agreement,
                    "tokens_per_second": round(chosen.tokens_per_second, 2),
                    "torch_tokens_per_second": round(reference.tokens_per_second, 2),
                    "speedup_vs_torch": round(
                        chosen.tokens_per_second / reference.tokens_per_second, 2
                    ),
                    "new_tokens_per_prompt": float(new_tokens),
                },
                thresholds={"greedy_agreement": min_agreement},
                passed=passed,
            )
            manifest.exporter["schemes"] = [t.summary() for t in trials]
            manifest.exporter["chosen_scheme"] = chosen.scheme
            manifest.created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
            write_manifest(stage_dir, manifest)
            install(stage_dir, out_dir / slug)
        console.print(
            f"chose {chosen.scheme}: greedy agreement {chosen.agreement:.2f}, "
            f"{chosen.tokens_per_second:.1f} tokens/s vs PyTorch fp32 "
            f"{reference.tokens_per_second:.1f}; {chosen.size_bytes / 1e6:.1f} MB vs "
            f"{fp32_bytes / 1e6:.1f} MB fp32"
        )
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)
