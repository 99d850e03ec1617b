"""The export pipeline: read checkpoint -> ONNX (optimum) -> INT8 -> package -> validate
(-> keep the most sensitive layers in fp32 if INT8 costs too much) -> install."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from appliance.models.manifest import Manifest, Validation, write_manifest
from exporters.checkpoint import CheckpointInfo, ExportError, inspect_checkpoint, slugify
from exporters.package import install, stage, swap_model
from exporters.quantize import cpu_preset, quantize, sensitive_nodes, to_fp16
from exporters.tasks import ALL_TASKS, PIPELINES, TASKS, TaskSpec
from exporters.validate import Validator

__all__ = ["ExportError", "export_model"]

SLUG = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
STEPS = 5
FIDELITY_GOAL = 0.99
"""Below this min cosine, look for layers worth keeping in fp32 (within the size budget)."""
MAX_SIZE_RATIO = 0.33
"""The INT8 file may grow to this share of the fp32 file by keeping layers in fp32."""


class Progress:
    """Numbered progress lines, one per pipeline step, with the time each took."""

    def __init__(self, console: Console, total: int = STEPS) -> None:
        self.console = console
        self.total = total
        self.step = 0

    @contextmanager
    def __call__(self, what: str) -> Iterator[None]:
        self.step += 1
        label = f"[{self.step}/{self.total}] {what}"
        start = time.perf_counter()
        with self.console.status(label):
            yield
        self.console.print(f"{label} ... done ({time.perf_counter() - start:.1f}s)")


def measure_speed(fp32: Path, int8: Path, manifest: Manifest, runs: int = 5) -> dict[str, int]:
    """Median microseconds per call, fp32 vs INT8, on this machine, on the sample texts."""
    import statistics

    from appliance.config import RuntimeConfig
    from appliance.runtime.session import create_session
    from appliance.tasks import build_runner

    runner = build_runner(int8.parent, manifest, create_session(int8, RuntimeConfig()))
    if not hasattr(runner, "tokenizer"):
        return {}
    from exporters.samples import SAMPLE_TEXTS

    arrays = runner.tokenizer.pad(runner.tokenizer.encode(SAMPLE_TEXTS[:8]))
    timings = {}
    for label, path in (("fp32_us", fp32), ("int8_us", int8)):
        session = create_session(path, RuntimeConfig())
        names = {i.name for i in session.get_inputs()}
        feeds = {k: v for k, v in arrays.items() if k in names}
        session.run(None, feeds)
        samples = []
        for _ in range(runs):
            start = time.perf_counter()
            session.run(None, feeds)
            samples.append(time.perf_counter() - start)
        timings[label] = int(statistics.median(samples) * 1e6)
    return timings


def report_table(manifest: Manifest, validation: Validation) -> Table:
    """What the export measured: fidelity against PyTorch, sizes and speed."""
    table = Table(title=f"{manifest.slug}: INT8 vs the original", show_header=True)
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("threshold", justify="right")
    for key, value in validation.metrics.items():
        limit = validation.thresholds.get(key)
        table.add_row(key, f"{value:.4f}", "" if limit is None else f">= {limit}")
    sizes = manifest.sizes
    table.add_row(
        "size fp32 / INT8",
        f"{sizes['fp32_bytes'] / 1e6:.1f} / {sizes['int8_bytes'] / 1e6:.1f} MB",
        f"{sizes['int8_bytes'] / sizes['fp32_bytes']:.0%}",
    )
    if "fp32_us" in sizes:
        table.add_row(
            "batch of 8, fp32 / INT8",
            f"{sizes['fp32_us'] / 1000:.1f} / {sizes['int8_us'] / 1000:.1f} ms",
            f"x{sizes['fp32_us'] / max(sizes['int8_us'], 1):.2f}",
        )
    if manifest.quantization.nodes_excluded:
        table.add_row("layers kept in fp32", str(len(manifest.quantization.nodes_excluded)), "")
    table.add_row("result", "passed" if validation.passed else "FAILED", "")
    return table


def onnx_export(source: Path, optimum_task: str, out: Path, what: str | None = None) -> None:
    """optimum's ONNX export, offline; its refusals become an ExportError naming `what`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from optimum.exporters.onnx import main_export

    # library_name="transformers": a sentence-transformers folder would otherwise be exported
    # with its pooling baked in; pooling is done (and validated) by the appliance's runner.
    try:
        main_export(
            str(source),
            output=out,
            task=optimum_task,
            library_name="transformers",
            do_validation=False,
        )
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise ExportError(
            f"optimum could not export {source} as {what or optimum_task}: {exc}"
        ) from exc


def _tokenizer_json(source: Path, work: Path) -> Path:
    if (source / "tokenizer.json").is_file():
        return source / "tokenizer.json"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source, use_fast=True)
    if not getattr(tok, "is_fast", False):
        raise ExportError(f"{source} has no tokenizer.json and its tokenizer cannot be converted.")
    path = work / "tokenizer.json"
    tok.backend_tokenizer.save(str(path))
    return path


def _keep_sensitive_layers(
    work: Path,
    stage_dir: Path,
    manifest: Manifest,
    validator: Validator,
    preset: str,
    baseline: Validation,
) -> Validation:
    """Measure, one candidate layer at a time, what keeping it in fp32 buys; keep the best ones
    that fit the size budget; re-measure. The baseline stays if nothing helps."""
    fp32 = work / "fp32" / "model.onnx"
    base_quant, base_size = manifest.quantization, manifest.sizes["int8_bytes"]
    base_file = work / "int8" / "model_quantized.onnx"
    budget = MAX_SIZE_RATIO * manifest.sizes["fp32_bytes"] - base_size
    gains: list[tuple[float, int, str]] = []
    for node in sensitive_nodes(fp32):
        trial, quant = quantize(work / "fp32", work / "trial", preset, exclude=[node])
        swap_model(stage_dir, manifest, trial, quant)
        score = validator(stage_dir, manifest).metrics["mean_cosine"]
        gains.append(
            (
                score - baseline.metrics["mean_cosine"],
                manifest.sizes["int8_bytes"] - base_size,
                node,
            )
        )
    chosen, spent = [], 0
    for gain, cost, node in sorted(gains, reverse=True):
        if gain > 0 and spent + cost <= budget:
            chosen.append(node)
            spent += cost
    if chosen:
        final, quant = quantize(work / "fp32", work / "final", preset, exclude=chosen)
        swap_model(stage_dir, manifest, final, quant)
        result = validator(stage_dir, manifest)
        if result.metrics["mean_cosine"] > baseline.metrics["mean_cosine"]:
            return result
    swap_model(stage_dir, manifest, base_file, base_quant)
    return baseline


def plan_export(source: Path, task: str, preset: str | None = None) -> dict[str, object]:
    """What an export would do, checked without exporting anything (--dry-run)."""
    if task not in ALL_TASKS:
        raise ExportError(f"task {task!r} is not supported; supported: {', '.join(ALL_TASKS)}")
    plan: dict[str, object] = {
        "source": str(source),
        "task": task,
        "preset": preset or cpu_preset(),
    }
    if task in TASKS:
        info = inspect_checkpoint(source, TASKS[task].name)
        plan |= {
            "model_type": info.config.get("model_type"),
            "architectures": info.config.get("architectures"),
            "optimum_task": TASKS[task].optimum_task,
            "max_tokens": info.max_tokens,
            "labels": info.labels,
            "pooling": info.pooling if task == "feature-extraction" else None,
            "tokenizer.json": (source / "tokenizer.json").is_file(),
        }
    elif not source.exists():
        raise ExportError(f"{source} does not exist")
    return plan


def export_model(
    source: Path,
    task: str,
    *,
    out_dir: Path,
    slug: str | None = None,
    name: str | None = None,
    description: str = "",
    preset: str | None = None,
    min_cosine: float | None = None,
    min_agreement: float | None = None,
    force: bool = False,
    console: Console | None = None,
    options: dict[str, Any] | None = None,
    precision: str = "int8",
) -> Manifest:
    """Export `source` for `task` into out_dir/slug. `options` go to the task pipelines that
    take them (e.g. gguf_file for text-generation)."""
    if task not in ALL_TASKS:
        raise ExportError(f"task {task!r} is not supported; supported: {', '.join(ALL_TASKS)}")
    if precision not in ("int8", "fp16"):
        raise ExportError(f"precision {precision!r}: choose int8 (CPU) or fp16 (GPU)")
    slug = slug or slugify(source.name)
    if not SLUG.match(slug):
        raise ExportError(f"slug {slug!r}: use lowercase letters, digits, '.', '_' and '-'")
    console = console or Console(stderr=True)
    if task in PIPELINES:
        module, function = PIPELINES[task].split(":")
        pipeline = getattr(importlib.import_module(module), function)
        return pipeline(  # type: ignore[no-any-return]
            source,
            out_dir=out_dir,
            slug=slug,
            name=name,
            description=description,
            preset=preset,
            force=force,
            console=console,
            # Thresholds go through only when given: each task has its own defaults.
            options={
                "precision": precision,
                **({"min_cosine": min_cosine} if min_cosine is not None else {}),
                **({"min_agreement": min_agreement} if min_agreement is not None else {}),
                **(options or {}),
            },
        )
    spec = TASKS[task]
    return export_encoder(
        source,
        spec,
        out_dir=out_dir,
        slug=slug,
        name=name,
        description=description,
        preset=preset,
        force=force,
        console=console,
        make_validator=lambda info: Validator(
            info,
            spec,
            min_cosine=0.98 if min_cosine is None else min_cosine,
            min_agreement=0.9 if min_agreement is None else min_agreement,
        ),
        precision=precision,
    )


def export_encoder(
    source: Path,
    spec: TaskSpec,
    *,
    out_dir: Path,
    slug: str,
    name: str | None,
    description: str,
    preset: str | None,
    force: bool,
    console: Console,
    make_validator: Callable[[CheckpointInfo], Callable[[Path, Manifest], Validation]],
    adjust: Callable[[Manifest], None] | None = None,
    precision: str = "int8",
) -> Manifest:
    """The pipeline every encoder task shares. `make_validator` measures fidelity for the
    task; `adjust` edits the manifest before it is written (a task built on another one).
    precision "fp16" converts instead of quantising, for GPU serving (INT8 kernels are a
    CPU strength; GPUs want fp16)."""
    task = spec.name
    progress = Progress(console)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".export-{slug}-", dir=out_dir))
    try:
        with progress("reading checkpoint"):
            info = inspect_checkpoint(source, task)
            try:
                tokenizer_json = _tokenizer_json(source, work)
            except (ValueError, OSError, KeyError) as exc:
                raise ExportError(f"cannot read the checkpoint's tokenizer: {exc}") from exc
        with progress(f"exporting to ONNX ({spec.optimum_task})"):
            onnx_export(source, spec.optimum_task, work / "fp32", what=task)
        preset = preset or cpu_preset()
        if precision == "fp16":
            with progress("converting to fp16 (for GPU serving)"):
                int8, quantization = to_fp16(work / "fp32", work / "int8")
        else:
            with progress(f"quantising to INT8 ({preset}, per-channel)"):
                int8, quantization = quantize(work / "fp32", work / "int8", preset)
        with progress("packaging"):
            import onnx

            graph = onnx.load(str(int8), load_external_data=False).graph
            manifest = stage(
                work / "model",
                slug=slug,
                name=name,
                description=description,
                spec=spec,
                info=info,
                int8_model=int8,
                fp32_model=work / "fp32" / "model.onnx",
                tokenizer_json=tokenizer_json,
                quantization=quantization,
                inputs=[i.name for i in graph.input],
                outputs=[o.name for o in graph.output],
            )
        with progress("validating INT8 ONNX against PyTorch"):
            validator = make_validator(info)
            validation = validator(work / "model", manifest)
            if precision == "int8" and validation.metrics["min_cosine"] < FIDELITY_GOAL:
                validation = _keep_sensitive_layers(
                    work, work / "model", manifest, validator, preset, validation
                )
            manifest.validation = validation
        report = ", ".join(f"{k} {v:.4f}" for k, v in validation.metrics.items())
        speed = measure_speed(work / "fp32" / "model.onnx", work / "model" / "model.onnx", manifest)
        manifest.sizes |= speed
        progress.console.print(report_table(manifest, validation))
        if not validation.passed and not force:
            raise ExportError(
                f"INT8 model disagrees with PyTorch beyond the thresholds ({report}; "
                f"need {validation.thresholds}). Nothing was written; --force writes it anyway."
            )
        if adjust is not None:
            adjust(manifest)
        write_manifest(work / "model", manifest)
        install(work / "model", out_dir / slug)
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)
