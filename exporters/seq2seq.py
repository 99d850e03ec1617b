"""The summarisation export pipeline for seq2seq models (T5, BART, ...):

read the checkpoint (generation defaults, special tokens, T5's task prefix) -> ONNX with past
key values (optimum text2text-generation-with-past, offline) -> the PyTorch reference (greedy
tokens, decode speed, encoder states) -> the encoder quantised like every encoder (dynamic
INT8, per-channel) -> the decoder quantised with each candidate scheme and measured through
the appliance's own runner -> keep the fastest scheme that agrees with PyTorch well enough
(as exporters.generation does for decoder-only models) -> install atomically.

Of optimum's four files the folder keeps two: `encoder.onnx` and `decoder.onnx`, the merged
decoder, whose `use_cache_branch` input picks the first step (no cache: it computes the
cross-attention keys and values) or a cached step. The merged graph holds the decoder's
weights once where decoder + decoder_with_past would hold them twice, and it is one session.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import msgspec
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
from exporters.checkpoint import ExportError, _max_tokens, accepted_inputs, read_config
from exporters.export import Progress, onnx_export
from exporters.generation import (
    SCHEMES,
    Quantiser,
    Trial,
    _has_external_data,
    _ids,
    _tokenizer_json,
    _versions,
    pick_scheme,
    prefix_agreement,
)
from exporters.package import install, pad_token_id
from exporters.quantize import cpu_preset, quantize

__all__ = ["DECODER_SCHEMES", "TEXTS", "export_seq2seq"]

OPTIMUM_TASK = "text2text-generation-with-past"
STEPS = 6
TEXTS = (
    "The city council approved a new budget on Monday. It raises spending on schools and "
    "roads, and cuts the cost of public transport for students and pensioners.",
    "Heavy rain caused flooding in the north of the country. Several villages were "
    "evacuated, trains were cancelled and the army helped to build barriers.",
    "The company reported record profits for the third quarter, driven by strong sales of "
    "its new phone in Asia and Europe. Its shares rose by ten percent.",
    "Scientists have found a new species of frog in the rainforest. It is smaller than a "
    "coin and sings at night to attract a mate.",
    "The patient was admitted with chest pain and shortness of breath. Doctors ran tests "
    "and found a blocked artery, which was treated the same evening.",
)
"""Fixed inputs for the fidelity check (greedy summaries compared with PyTorch)."""
NEW_TOKENS = 16
MIN_AGREEMENT = 0.5
"""Share of greedy tokens that must match PyTorch before the first difference (as for
text-generation: one early flip to an equally good word costs a whole text)."""
MAX_NEW_TOKENS = 512
EXAMPLE = {"text": TEXTS[0]}


# ---- candidate quantisation schemes for the decoder ------------------------------------------


def _all_nodes(graph: Any, outer: frozenset[str] = frozenset()) -> list[tuple[Any, frozenset[str]]]:
    """Every node, If-branches included, with the constant names it can see."""
    import onnx

    constants = set(outer) | {i.name for i in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    seen = frozenset(constants)
    found = []
    for node in graph.node:
        found.append((node, seen))
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                found += _all_nodes(attr.g, seen)
    return found


def _activation_matmuls(fp32: Path) -> list[str]:
    """Attention's MatMuls of two activations (scores, mixing) in both branches of the merged
    decoder, and the LM head: quantising them on the fly costs a decoder the most."""
    import onnx

    graph = onnx.load(str(fp32), load_external_data=False).graph
    names = {
        node.name
        for node, constants in _all_nodes(graph)
        if node.op_type == "MatMul"
        and (not any(i in constants for i in node.input) or "lm_head" in node.name)
    }
    return sorted(names)


def _dynamic_keep_attention(fp32_dir: Path, out: Path, preset: str) -> tuple[Path, Quantization]:
    keep = _activation_matmuls(fp32_dir / "model.onnx")
    path, quant = quantize(fp32_dir, out, preset, exclude=keep)
    quant.method = "dynamic-int8-keep-attention"
    return path, quant


DECODER_SCHEMES: dict[str, Quantiser] = {
    "dynamic-int8": SCHEMES["dynamic-int8"],
    "dynamic-int8-keep-attention": _dynamic_keep_attention,
    "weight-only-int8": SCHEMES["weight-only-int8"],
    "weight-only-int8-acc4": SCHEMES["weight-only-int8-acc4"],
}
"""Candidates for the merged decoder: dynamic INT8 (optimum's ORTQuantizer, which quantises
inside the If-branches); the same with attention's activation MatMuls and the LM head kept in
fp32; weight-only 8-bit MatMulNBits computing in fp32 or, accuracy_level 4, in int8."""


# ---- reading the checkpoint ------------------------------------------------------------------


@dataclass
class Checkpoint:
    folder: Path
    config: dict[str, Any]
    name: str
    max_tokens: int
    max_new_tokens: int


def _inspect(folder: Path) -> Checkpoint:
    config = read_config(folder)
    if not config.get("is_encoder_decoder"):
        raise ExportError(
            f"{folder} is not an encoder-decoder model (config.json: is_encoder_decoder is not "
            "true): summarisation takes T5, BART and the like; export decoder-only models as "
            "text-generation."
        )
    positions = [
        config.get(k) for k in ("max_position_embeddings", "max_target_positions", "n_positions")
    ]
    limit = next((int(p) for p in positions if isinstance(p, int) and p > 1), None)
    return Checkpoint(
        folder=folder,
        config=config,
        name=str(config.get("_name_or_path") or folder.name) or folder.name,
        max_tokens=_max_tokens(folder, config),
        max_new_tokens=min(MAX_NEW_TOKENS, limit - 1) if limit else MAX_NEW_TOKENS,
    )


def generation_settings(
    generation: dict[str, Any], config: dict[str, Any], max_new_tokens: int
) -> dict[str, Any]:
    """The runner's special tokens and default parameters, from the checkpoint's generation
    config (a dict) with task_specific_params["summarization"] on top, as transformers'
    summarization pipeline applies them. Lengths are converted to summary tokens:
    transformers' max_length/min_length count the decoder start token."""
    task = (config.get("task_specific_params") or {}).get("summarization") or {}
    params = {**generation, **{k: v for k, v in task.items() if k != "prefix"}}
    prefix = task.get("prefix", config.get("prefix")) or ""
    if params.get("max_new_tokens"):
        max_length = int(params["max_new_tokens"])
    else:
        max_length = int(params.get("max_length") or 20) - 1
    min_length = max(int(params.get("min_new_tokens") or 0), int(params.get("min_length") or 0) - 1)
    max_length = max(1, min(max_length, max_new_tokens))
    min_length = max(0, min(min_length, max_length))
    eos = _ids(params.get("eos_token_id"), config.get("eos_token_id"))
    pad = _ids(params.get("pad_token_id"), config.get("pad_token_id"))
    start = _ids(params.get("decoder_start_token_id"), config.get("decoder_start_token_id"), pad)
    if not eos or not start:
        raise ExportError(
            "the checkpoint's configs give no eos_token_id or decoder_start_token_id: "
            "cannot drive its decoder."
        )
    forced_bos = params.get("forced_bos_token_id")
    return {
        "decoder_start_token_id": start[0],
        "eos_token_ids": eos,
        "pad_token_id": pad[0] if pad else None,
        "forced_bos_token_id": forced_bos if isinstance(forced_bos, int) else None,
        "forced_eos_token_ids": _ids(params.get("forced_eos_token_id")),
        "prefix": prefix,
        "generation": {
            "min_length": min_length,
            "max_length": max_length,
            "num_beams": max(1, int(params.get("num_beams") or 1)),
            "length_penalty": float(params.get("length_penalty", 1.0)),
            "no_repeat_ngram_size": int(params.get("no_repeat_ngram_size") or 0),
            "repetition_penalty": float(params.get("repetition_penalty") or 1.0),
        },
        "early_stopping": params.get("early_stopping", False),
    }


def _onnx_export(folder: Path, out: Path) -> None:
    onnx_export(folder, OPTIMUM_TASK, out, what="summarisation")
    for name in ("encoder_model.onnx", "decoder_model_merged.onnx"):
        if not (out / name).is_file():
            raise ExportError(
                f"optimum wrote no {name}: this architecture's seq2seq export does not have "
                "the encoder + merged decoder layout the appliance runs."
            )
        if _has_external_data(out / name):
            raise ExportError(f"{name} is over 2 GB: models this large are not supported here.")


def _graph_config(decoder: Path, encoder: Path) -> dict[str, Any]:
    """What the runner needs to drive the graphs, checked against the layout it supports."""
    import onnx

    graph = onnx.load(str(decoder), load_external_data=False).graph
    inputs = {i.name: i for i in graph.input}
    outputs = {o.name: o for o in graph.output}
    needed = {"input_ids", "encoder_hidden_states", "encoder_attention_mask", "use_cache_branch"}

    def layer(name: str) -> tuple[int, bool]:
        return int(name.split(".")[1]), name.endswith("value")

    self_past = sorted((n for n in inputs if ".decoder." in n), key=layer)
    cross_past = sorted((n for n in inputs if ".encoder." in n), key=layer)
    presents = {n.replace("past_key_values", "present") for n in self_past + cross_past}
    if needed - set(inputs) or not self_past or "logits" not in outputs or presents - set(outputs):
        raise ExportError(
            "the decoder graph does not have the merged seq2seq layout this appliance runs "
            "(input_ids, encoder_hidden_states, encoder_attention_mask, use_cache_branch, "
            "past_key_values.N.decoder/encoder.key/value -> logits, present.N...)."
        )
    dims = [d.dim_value for d in inputs[self_past[0]].type.tensor_type.shape.dim]
    if len(dims) != 4 or not dims[1] or not dims[3]:
        raise ExportError(f"past key values of shape {dims} are not [batch, heads, length, dim].")
    vocab = [d.dim_value for d in outputs["logits"].type.tensor_type.shape.dim][-1]
    enc = onnx.load(str(encoder), load_external_data=False).graph
    if "last_hidden_state" not in {o.name for o in enc.output}:
        raise ExportError("the encoder graph has no last_hidden_state output.")
    return {
        "num_layers": len(self_past) // 2,
        "num_heads": dims[1],
        "head_dim": dims[3],
        "vocab_size": vocab or None,
        "self_past_inputs": self_past,
        "cross_past_inputs": cross_past,
        "encoder_inputs": [i.name for i in enc.input],
    }


# ---- measuring -------------------------------------------------------------------------------


@dataclass
class Reference:
    tokens: list[list[int]]
    tokens_per_second: float
    encoder_states: list[Any]
    generation: dict[str, Any]


def _torch_reference(ckpt: Checkpoint, prefix: str, new_tokens: int) -> Reference:
    """Greedy summaries of TEXTS by the PyTorch model (exactly new_tokens each, unless it is
    forced to end with EOS), its decode speed, and its encoder's states."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ckpt.folder)
    model = AutoModelForSeq2SeqLM.from_pretrained(ckpt.folder, dtype=torch.float32).eval()
    eos = set(_ids(model.generation_config.eos_token_id))

    def encode(text: str) -> Any:
        return accepted_inputs(
            model.forward,
            tokenizer(
                prefix + text, return_tensors="pt", truncation=True, max_length=ckpt.max_tokens
            ),
        )

    def generate(text: str, n: int) -> list[int]:
        inputs = encode(text)
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                num_beams=1,
                no_repeat_ngram_size=0,
                repetition_penalty=1.0,
            )
        tokens = [int(t) for t in out[0, 1:]]
        cut = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))
        return tokens[:cut]

    generate(TEXTS[0], 2)  # warm-up
    start = time.perf_counter()
    tokens = [generate(t, new_tokens) for t in TEXTS]
    took = time.perf_counter() - start
    states = []
    with torch.inference_mode():
        for text in TEXTS:
            states.append(model.get_encoder()(**encode(text)).last_hidden_state[0].numpy())
    return Reference(
        tokens, sum(map(len, tokens)) / took, states, model.generation_config.to_dict()
    )


def _cosines(ours: list[Any], reference: list[Any]) -> list[float]:
    import numpy as np

    values: list[float] = []
    for a, b in zip(ours, reference, strict=True):
        dot = (a * b).sum(-1)
        norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
        values += (dot / np.maximum(norms, 1e-12)).tolist()
    return values


def _appliance_run(
    stage_dir: Path, manifest: Manifest, new_tokens: int
) -> tuple[list[list[int]], float, str, list[Any]]:
    """Greedy summaries of TEXTS by the appliance's own runner, its decode speed (median of
    three passes), a sample summary, and its encoder's states."""
    from appliance.runtime.session import create_session
    from appliance.tasks.summarise import SummarisationRunner

    session = create_session(stage_dir / manifest.files["model"].path, RuntimeConfig())
    runner = SummarisationRunner(stage_dir, manifest, session)
    runner.warmup()
    n = new_tokens
    inputs = [
        runner.parse_input(
            {
                "text": t,
                "min_length": n,
                "max_length": n,
                "num_beams": 1,
                "no_repeat_ngram_size": 0,
                "repetition_penalty": 1.0,
            }
        )
        for t in TEXTS
    ]
    items = runner.preprocess(inputs)
    speeds = []
    for _ in range(3):
        start = time.perf_counter()
        tokens = [runner.infer([item])[0][0] for item in items]
        speeds.append(sum(map(len, tokens)) / (time.perf_counter() - start))
    sample = runner.postprocess(items[0], [tokens[0]]).output["output"]
    states = []
    for item in items:
        arrays = runner.tokenizer.pad([item.encoded])
        states.append(runner.loop.encode(arrays)[0])
    return tokens, statistics.median(speeds), str(sample), states


# ---- the pipeline ----------------------------------------------------------------------------


def export_seq2seq(
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
    """Export a seq2seq checkpoint for summarisation (see the module docstring).

    options: schemes (decoder candidates from DECODER_SCHEMES, default all),
    min_greedy_agreement (default 0.5), new_tokens (greedy tokens per text in the fidelity
    check, default 16), precision (int8 only)."""
    if options.get("precision", "int8") != "int8":
        raise ExportError("summarisation exports INT8 for CPU serving only (no --precision fp16).")
    schemes = list(options.get("schemes") or DECODER_SCHEMES)
    unknown = [s for s in schemes if s not in DECODER_SCHEMES]
    if unknown:
        raise ExportError(f"unknown schemes {unknown}; choose from {', '.join(DECODER_SCHEMES)}")
    # Not options["min_agreement"]: export_model fills that with the classifiers' argmax
    # agreement (0.9), a different measure from greedy prefix agreement.
    min_agreement = float(options.get("min_greedy_agreement", MIN_AGREEMENT))
    new_tokens = int(options.get("new_tokens", NEW_TOKENS))
    progress = Progress(console, STEPS)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".export-{slug}-", dir=out_dir))
    try:
        with progress("reading checkpoint"):
            ckpt = _inspect(source)
            tokenizer_json = _tokenizer_json(source, work)
        with progress(f"exporting to ONNX ({OPTIMUM_TASK})"):
            fp32 = work / "fp32"
            _onnx_export(source, fp32)
            graph_config = _graph_config(
                fp32 / "decoder_model_merged.onnx", fp32 / "encoder_model.onnx"
            )
        with progress("PyTorch fp32 reference (greedy tokens, decode speed)"):
            task = (ckpt.config.get("task_specific_params") or {}).get("summarization") or {}
            prefix = str(task.get("prefix", ckpt.config.get("prefix")) or "")
            reference = _torch_reference(ckpt, prefix, new_tokens)
            settings = generation_settings(reference.generation, ckpt.config, ckpt.max_new_tokens)

        # Each part in a folder of its own as model.onnx, as the quantisers expect.
        parts = {}
        for part, file in (
            ("encoder", "encoder_model.onnx"),
            ("decoder", "decoder_model_merged.onnx"),
        ):
            parts[part] = work / f"{part}-fp32"
            parts[part].mkdir()
            shutil.copyfile(fp32 / file, parts[part] / "model.onnx")
            shutil.copyfile(fp32 / "config.json", parts[part] / "config.json")
        fp32_sizes = {p: (d / "model.onnx").stat().st_size for p, d in parts.items()}

        preset = preset or cpu_preset()
        stage_dir = work / "model"
        stage_dir.mkdir()
        with progress(f"quantising the encoder ({preset}, per-channel)"):
            encoder_int8, encoder_quant = quantize(parts["encoder"], work / "encoder-int8", preset)
            shutil.copyfile(encoder_int8, stage_dir / "encoder.onnx")
            shutil.copyfile(tokenizer_json, stage_dir / "tokenizer.json")

        import onnx

        encoder_graph = onnx.load(str(stage_dir / "encoder.onnx"), load_external_data=False).graph
        pad = pad_token_id(stage_dir / "tokenizer.json", ckpt.config)
        manifest = Manifest(
            slug=slug,
            code=slug.upper().replace("-", "_").replace(".", "_"),
            name=name or ckpt.name,
            description=description,
            task="summarisation",
            files={
                "model": file_entry(stage_dir, "encoder.onnx"),
                "encoder": file_entry(stage_dir, "encoder.onnx"),
                "tokenizer": file_entry(stage_dir, "tokenizer.json"),
            },
            inputs=[i.name for i in encoder_graph.input],
            outputs=[o.name for o in encoder_graph.output],
            max_tokens=ckpt.max_tokens,
            pad_token_id=pad,
            example_payload=dict(EXAMPLE),
            config={
                "model_type": ckpt.config.get("model_type"),
                **settings,
                "max_new_tokens": ckpt.max_new_tokens,
                "decoder": "merged",
                **graph_config,
            },
            exporter={"appliance": __version__, "libraries": _versions()},
            source=str(source.resolve()),
        )

        trials: list[Trial] = []
        states: list[Any] = []
        with progress(f"quantising the decoder and measuring {len(schemes)} scheme(s)"):
            for scheme in schemes:
                trial = Trial(scheme)
                trials.append(trial)
                try:
                    path, quant = DECODER_SCHEMES[scheme](parts["decoder"], work / scheme, preset)
                    shutil.copyfile(path, stage_dir / "decoder.onnx")
                    manifest.files["decoder"] = file_entry(stage_dir, "decoder.onnx")
                    trial.size_bytes = manifest.files["decoder"].size
                    ours, speed, trial.sample, states = _appliance_run(
                        stage_dir, manifest, new_tokens
                    )
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
                    f"decoder {trial.size_bytes / 1e6:.2f} MB"
                )

        chosen, passed = pick_scheme(
            trials,
            reference.tokens_per_second,
            min_agreement,
            force=force,
            console=console,
            what="summaries",
        )

        with progress(f"packaging ({chosen.scheme})"):
            assert chosen.path is not None and chosen.quantization is not None
            shutil.copyfile(chosen.path, stage_dir / "decoder.onnx")
            manifest.files["decoder"] = file_entry(stage_dir, "decoder.onnx")
            cosines = _cosines(states, reference.encoder_states)
            int8_sizes = {p: manifest.files[p].size for p in ("encoder", "decoder")}
            manifest.quantization = chosen.quantization
            manifest.sizes = {
                "fp32_bytes": sum(fp32_sizes.values()),
                "int8_bytes": sum(int8_sizes.values()),
                **{f"{p}_fp32_bytes": v for p, v in fp32_sizes.items()},
                **{f"{p}_int8_bytes": v for p, v in int8_sizes.items()},
            }
            manifest.validation = Validation(
                samples=len(TEXTS),
                metrics={
                    "greedy_agreement": chosen.agreement,
                    "tokens_per_second": round(chosen.tokens_per_second, 2),
                    "torch_tokens_per_second": round(reference.tokens_per_second, 2),
                    "new_tokens_per_text": float(new_tokens),
                    "encoder_min_cosine": round(min(cosines), 5),
                    "encoder_mean_cosine": round(statistics.fmean(cosines), 5),
                },
                thresholds={"greedy_agreement": min_agreement},
                passed=passed,
            )
            manifest.exporter["schemes"] = [t.summary() for t in trials]
            manifest.exporter["chosen_scheme"] = chosen.scheme
            manifest.exporter["encoder_quantization"] = msgspec.structs.asdict(encoder_quant)
            manifest.created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
            write_manifest(stage_dir, manifest)
            install(stage_dir, out_dir / slug)
        console.print(
            f"chose {chosen.scheme}: greedy agreement {chosen.agreement:.2f}, "
            f"{chosen.tokens_per_second:.1f} tokens/s vs PyTorch fp32 "
            f"{reference.tokens_per_second:.1f}; encoder + decoder "
            f"{manifest.sizes['int8_bytes'] / 1e6:.1f} MB vs "
            f"{manifest.sizes['fp32_bytes'] / 1e6:.1f} MB fp32"
        )
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)
