"""Export pipelines for the image tasks: CLIP (zero-shot-image-classification: text and image
vectors in one space) and ViT-style image classifiers (image-classification).

Both: read the checkpoint and its image processor -> ONNX (optimum, offline) -> INT8
(dynamic, per-channel) -> package -> validate the appliance's own runner (its pillow + numpy
preprocessing included) against transformers on generated images -> keep the layers INT8
hurts most in fp32 if fidelity is short -> install atomically.

CLIP is exported as one graph by optimum, then split into its two towers (a vision and a text
file). One graph needs both an image and a text on every call (onnxruntime refuses a missing
input even when the asked output does not depend on it), so a text vector would cost a
dummy run of the vision tower and an image vector one of the text tower. Split, a request
runs only the tower it needs, label prompts can be embedded once and reused, and each tower
is quantised and validated on its own.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
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
from appliance.runtime.images import ImagePreprocessor
from appliance.runtime.session import create_session
from appliance.tasks import build_runner
from exporters.checkpoint import ExportError, read_config
from exporters.export import FIDELITY_GOAL, MAX_SIZE_RATIO, Progress, onnx_export, report_table
from exporters.package import install, library_versions
from exporters.quantize import cpu_preset, quantize, to_fp16
from exporters.samples import SAMPLE_TEXTS
from exporters.validate import cosine_rows

OPTIONS = ("min_cosine", "min_agreement", "prompt_template", "precision")
PROMPT_TEMPLATE = "a photo of a {label}."
SAMPLE_LABELS = [
    "red square",
    "blue circle",
    "green triangle",
    "colour gradient",
    "checkerboard",
    "random noise",
    "striped pattern",
    "cat",
]
# What the search may keep in fp32: the weights INT8 hurts most (feed-forward outputs: CLIP
# fc2, ViT output.dense; the patch embedding, which sees raw pixels; the final projections),
# and the attention MatMuls of two activations (both operands quantised per tensor on the fly;
# keeping them costs no file size).
_CANDIDATES = re.compile(
    r"(/layers?\.\d+/(mlp/fc2|output/dense)/MatMul"
    r"|/(patch_embedding|patch_embeddings/projection)/Conv"
    r"|/(visual|text)_projection/MatMul)$"
)


# ---- sample inputs ---------------------------------------------------------------------------


def sample_images() -> list[Image.Image]:
    """Deterministic synthetic images: gradients, shapes, noise, odd sizes and colour modes
    (every path of the preprocessing: resize up and down, crop, RGB conversion)."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:48, 0:64]
    gradient = np.stack([xs * 4, ys * 5, 255 - xs * 4], -1).astype(np.uint8)
    images = [
        Image.fromarray(gradient),
        Image.fromarray(gradient.transpose(1, 0, 2).copy()),  # portrait
    ]
    yy, xx = np.mgrid[0:40, 0:40]
    radial = (np.hypot(yy - 20, xx - 20) * 9).clip(0, 255).astype(np.uint8)
    images.append(Image.fromarray(np.stack([radial, 255 - radial, radial // 2], -1)))
    square = Image.new("RGB", (50, 50), "white")
    ImageDraw.Draw(square).rectangle((10, 10, 39, 39), fill="red")
    circle = Image.new("RGB", (64, 64), "yellow")
    ImageDraw.Draw(circle).ellipse((8, 8, 56, 56), fill="blue")
    triangle = Image.new("RGB", (80, 60), "black")
    ImageDraw.Draw(triangle).polygon([(40, 5), (75, 55), (5, 55)], fill="green")
    images += [square, circle, triangle]
    images.append(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
    gray = rng.normal(128, 40, (30, 45)).clip(0, 255).astype(np.uint8)
    images.append(Image.fromarray(gray, mode="L"))
    checker = ((np.indices((64, 64)) // 8).sum(0) % 2 * 255).astype(np.uint8)
    images.append(Image.fromarray(checker, mode="L").convert("RGB"))
    stripes = np.zeros((20, 100, 3), dtype=np.uint8)
    stripes[:, ::10] = (255, 128, 0)
    images.append(Image.fromarray(stripes))  # very wide: shortest-edge resize, then crop
    rgba = Image.new("RGBA", (48, 48), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).ellipse((4, 4, 44, 44), fill=(200, 30, 90, 255))
    images.append(rgba)
    images.append(Image.fromarray(rng.integers(0, 256, (7, 10, 3), dtype=np.uint8)))  # tiny
    images.append(circle.convert("P", palette=Image.Palette.ADAPTIVE, colors=8))
    return images


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def example_image() -> str:
    """A tiny PNG (a red square on white) for manifest.example_payload and warm-up."""
    image = Image.new("RGB", (16, 16), "white")
    ImageDraw.Draw(image).rectangle((4, 4, 11, 11), fill="red")
    return png_base64(image)


# ---- reading the checkpoint ------------------------------------------------------------------


def read_preprocessing(source: Path) -> dict[str, Any]:
    """The checkpoint's image processor as the plain settings appliance.runtime.images takes."""
    from PIL.Image import Resampling
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(source, use_fast=False)
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(
            f"{source} has no usable preprocessor_config.json ({exc}); save the model's image "
            "processor into the folder (processor.save_pretrained(folder))."
        ) from exc
    if getattr(processor, "crop_pct", None) is not None:
        raise ExportError(
            f"{type(processor).__name__} (crop_pct resizing) is not supported; CLIP- and "
            "ViT-style processors are."
        )
    normalize = getattr(processor, "do_normalize", False)
    resample = getattr(processor, "resample", None)  # 0 is NEAREST: test for None
    settings = {
        "processor": type(processor).__name__,
        "resize": dict(processor.size) if getattr(processor, "do_resize", False) else None,
        "resample": Resampling(3 if resample is None else int(resample)).name.lower(),
        "center_crop": (
            dict(processor.crop_size) if getattr(processor, "do_center_crop", False) else None
        ),
        "rescale_factor": (
            float(processor.rescale_factor) if getattr(processor, "do_rescale", False) else None
        ),
        "image_mean": [float(v) for v in processor.image_mean] if normalize else None,
        "image_std": [float(v) for v in processor.image_std] if normalize else None,
    }
    try:
        ImagePreprocessor.from_config(settings)
    except ValueError as exc:
        raise ExportError(f"{source}: {exc}") from exc
    return settings


def _visual_tokens(vision_config: dict[str, Any]) -> int:
    """Patches + the class token: what one image occupies in the model."""
    size, patch = vision_config.get("image_size", 224), vision_config.get("patch_size", 16)
    height, width = size if isinstance(size, list | tuple) else (size, size)
    patch_h, patch_w = patch if isinstance(patch, list | tuple) else (patch, patch)
    return int((height // patch_h) * (width // patch_w) + 1)


class PipelineOptions:
    """The pipeline options: thresholds, and precision "int8" (CPU, the default) or "fp16"
    (converted instead of quantised, for GPU serving)."""

    def __init__(self, options: dict[str, Any], console: Console) -> None:
        # Ignored with a word, not refused: export_model may hand every pipeline options
        # meant for some other task.
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            console.print(f"ignoring option(s) {unknown}: the image tasks take {list(OPTIONS)}")
        self.min_cosine = float(options.get("min_cosine", 0.98))
        self.min_agreement = float(options.get("min_agreement", 0.9))
        self.precision = str(options.get("precision", "int8"))
        if self.precision not in ("int8", "fp16"):
            raise ExportError(f"precision {self.precision!r}: choose int8 (CPU) or fp16 (GPU)")

    def convert(self, fp32_dir: Path, out: Path, preset: str) -> tuple[Path, Quantization]:
        if self.precision == "fp16":
            return to_fp16(fp32_dir, out)
        return quantize(fp32_dir, out, preset)

    def step(self, preset: str) -> str:
        if self.precision == "fp16":
            return "converting to fp16 (for GPU serving)"
        return f"quantising to INT8 ({preset}, per-channel)"

    @property
    def searches(self) -> bool:
        """Whether a fidelity shortfall may be met by keeping layers in fp32 (INT8 only)."""
        return self.precision == "int8"


# ---- ONNX --------------------------------------------------------------------------------------


def _onnx_export(source: Path, optimum_task: str, out: Path) -> Path:
    onnx_export(source, optimum_task, out)
    return out / "model.onnx"


def split_clip(model_path: Path, work: Path, source: Path) -> tuple[dict[str, Path], float]:
    """The combined CLIP graph -> {"vision": dir, "text": dir} (each holding model.onnx), and
    exp(logit_scale) read from the graph's initializer."""
    import onnx
    from onnx import numpy_helper
    from onnx.utils import Extractor

    model = onnx.load(str(model_path))
    scale = [i for i in model.graph.initializer if i.name == "logit_scale"]
    if not scale:
        raise ExportError("the exported CLIP graph has no logit_scale: not a CLIP model?")
    logit_scale = float(np.exp(numpy_helper.to_array(scale[0])))
    inputs = {i.name for i in model.graph.input}
    extractor = Extractor(model)
    towers = {
        "vision": (["pixel_values"], ["image_embeds"]),
        "text": ([n for n in ("input_ids", "attention_mask") if n in inputs], ["text_embeds"]),
    }
    dirs = {}
    for tower, (ins, outs) in towers.items():
        folder = work / f"fp32-{tower}"
        folder.mkdir(parents=True)
        onnx.save(extractor.extract_model(ins, outs), str(folder / "model.onnx"))
        # ORTQuantizer looks for the config beside the model (and warns without it).
        shutil.copyfile(source / "config.json", folder / "config.json")
        dirs[tower] = folder
    return dirs, logit_scale


def candidate_nodes(fp32_model: Path) -> list[str]:
    import onnx

    graph = onnx.load(str(fp32_model), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    return [
        n.name
        for n in graph.node
        if _CANDIDATES.search(n.name)
        or (n.op_type == "MatMul" and not weights.intersection(n.input))
    ]


# ---- fidelity ------------------------------------------------------------------------------


def _run_runner(folder: Path, manifest: Manifest, payloads: list[dict[str, Any]]) -> np.ndarray:
    """The appliance's own runner, from base64 payloads to raw outputs (as it serves)."""
    runner = build_runner(
        folder, manifest, create_session(folder / manifest.files["model"].path, RuntimeConfig())
    )
    inputs = [runner.parse_input(p) for p in payloads]
    return np.stack(runner.infer(runner.preprocess(inputs))).astype(np.float64)


def decoded_rgb(images: list[str]) -> list[Image.Image]:
    """What transformers' processors get: the same files, decoded, in RGB (as the runners
    convert them; CLIP's processor does the same, ViT's would not take a grayscale image)."""
    return [Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB") for b in images]


DECIDED_MARGIN = 0.1
"""A sample counts for agreement when PyTorch's best label leads the next by this much: on
near-ties (random weights, synthetic images) the argmax flips on noise far below any real
fidelity loss, and an export must not be refused for that."""


def agreement(ours: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Argmax agreement over all samples, and over the samples PyTorch decides clearly."""
    same = ours.argmax(-1) == reference.argmax(-1)
    top2 = np.sort(reference, axis=-1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) >= DECIDED_MARGIN
    return {
        "argmax_agreement": float(same.mean()),
        "decided_agreement": float(same[decided].mean()) if decided.any() else 1.0,
        "decided_samples": float(decided.sum()),
        "max_abs_diff": float(np.abs(ours - reference).max()),
    }


class ClipValidator:
    """PyTorch reference computed once (transformers' tokenizer and image processor), then
    any number of candidate folders scored: per-tower cosine and zero-shot argmax agreement."""

    def __init__(
        self,
        source: Path,
        template: str,
        max_tokens: int,
        *,
        min_cosine: float,
        min_agreement: float,
    ) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.images = [png_base64(i) for i in sample_images()]
        self.texts = list(SAMPLE_TEXTS)
        self.labels = list(SAMPLE_LABELS)
        model = CLIPModel.from_pretrained(source).eval()
        tokenizer = AutoTokenizer.from_pretrained(source)
        processor = AutoImageProcessor.from_pretrained(source, use_fast=False)

        def embed_texts(texts: list[str]) -> torch.Tensor:
            batch = tokenizer(
                texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt"
            )
            return torch.nn.functional.normalize(model.get_text_features(**batch))

        with torch.inference_mode():
            pixels = processor(images=decoded_rgb(self.images), return_tensors="pt")
            image = torch.nn.functional.normalize(model.get_image_features(**pixels))
            text = embed_texts(self.texts)
            prompts = embed_texts([template.format(label=label) for label in self.labels])
            probs = torch.softmax(model.logit_scale.exp() * image @ prompts.T, dim=-1)
        self.ref_image = image.double().numpy()
        self.ref_text = text.double().numpy()
        self.ref_probs = probs.double().numpy()
        self.thresholds = {"min_cosine": min_cosine, "zero_shot_decided_agreement": min_agreement}

    def tower_score(self, folder: Path, manifest: Manifest, tower: str) -> float:
        """Mean cosine of one tower's embeddings (what the layer search ranks by)."""
        if tower == "vision":
            ours = _run_runner(folder, manifest, [{"image": b} for b in self.images])
            return float(cosine_rows(ours, self.ref_image).mean())
        ours = _run_runner(folder, manifest, [{"text": t} for t in self.texts])
        return float(cosine_rows(ours, self.ref_text).mean())

    def __call__(self, folder: Path, manifest: Manifest) -> Validation:
        image = _run_runner(folder, manifest, [{"image": b} for b in self.images])
        text = _run_runner(folder, manifest, [{"text": t} for t in self.texts])
        probs = _run_runner(
            folder, manifest, [{"image": b, "labels": self.labels} for b in self.images]
        )
        image_cos, text_cos = cosine_rows(image, self.ref_image), cosine_rows(text, self.ref_text)
        both = np.concatenate([image_cos, text_cos])
        metrics = {
            "min_cosine": float(both.min()),
            "mean_cosine": float(both.mean()),
            "image_min_cosine": float(image_cos.min()),
            "image_mean_cosine": float(image_cos.mean()),
            "text_min_cosine": float(text_cos.min()),
            "text_mean_cosine": float(text_cos.mean()),
            **{f"zero_shot_{k}": v for k, v in agreement(probs, self.ref_probs).items()},
        }
        return Validation(
            samples=len(self.images) + len(self.texts),
            metrics=metrics,
            thresholds=dict(self.thresholds),
            passed=all(metrics[k] >= v for k, v in self.thresholds.items()),
        )


class ClassifierValidator:
    """Softmax (or sigmoid) scores of the INT8 runner against the PyTorch classifier."""

    def __init__(
        self, source: Path, multi_label: bool, *, min_cosine: float, min_agreement: float
    ) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        self.images = [png_base64(i) for i in sample_images()]
        model = AutoModelForImageClassification.from_pretrained(source).eval()
        processor = AutoImageProcessor.from_pretrained(source, use_fast=False)
        with torch.inference_mode():
            pixels = processor(images=decoded_rgb(self.images), return_tensors="pt")
            logits = model(**pixels).logits.double()
        scores = torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)
        self.reference = scores.numpy()
        self.multi_label = multi_label
        self.thresholds = {"min_cosine": min_cosine, "decided_agreement": min_agreement}

    def __call__(self, folder: Path, manifest: Manifest) -> Validation:
        from appliance.tasks.labels import sigmoid, softmax

        logits = _run_runner(folder, manifest, [{"image": b} for b in self.images])
        ours = sigmoid(logits) if self.multi_label else softmax(logits)
        cos = cosine_rows(ours, self.reference)
        metrics = {
            "min_cosine": float(cos.min()),
            "mean_cosine": float(cos.mean()),
            **agreement(ours, self.reference),
        }
        return Validation(
            samples=len(self.images),
            metrics=metrics,
            thresholds=dict(self.thresholds),
            passed=all(metrics[k] >= v for k, v in self.thresholds.items()),
        )


# ---- quantisation with a fidelity search -------------------------------------------------------


class Tower:
    """One ONNX file of a model folder: its fp32 source, its staged INT8 file and how that was
    quantised."""

    def __init__(self, name: str, fp32_dir: Path, stage_dir: Path, file_name: str, role: str):
        self.name, self.fp32_dir, self.role = name, fp32_dir, role
        self.staged = stage_dir / file_name
        self.fp32_bytes = (fp32_dir / "model.onnx").stat().st_size
        self.quantization = Quantization()

    def use(self, int8_file: Path, quantization: Quantization, manifest: Manifest | None) -> None:
        shutil.copyfile(int8_file, self.staged)
        self.quantization = quantization
        if manifest is not None:
            manifest.files[self.role] = file_entry(self.staged.parent, self.staged.name)

    @property
    def int8_bytes(self) -> int:
        return self.staged.stat().st_size


def keep_sensitive_layers(
    tower: Tower,
    work: Path,
    preset: str,
    score: Callable[[], float],
    baseline: float,
    manifest: Manifest,
) -> float:
    """Measure, one candidate layer at a time, what keeping it in fp32 buys for this tower;
    keep the best ones within the size budget; re-measure. The baseline stays if nothing
    helps. Returns the tower's score with what was kept."""
    base_file, base_quant = work / f"base-{tower.name}.onnx", tower.quantization
    shutil.copyfile(tower.staged, base_file)
    base_size = tower.int8_bytes
    budget = MAX_SIZE_RATIO * tower.fp32_bytes - base_size
    gains: list[tuple[float, int, str]] = []
    for node in candidate_nodes(tower.fp32_dir / "model.onnx"):
        trial, quant = quantize(tower.fp32_dir, work / f"trial-{tower.name}", preset, [node])
        tower.use(trial, quant, manifest)
        gains.append((score() - baseline, tower.int8_bytes - base_size, node))
    chosen, spent = [], 0
    for gain, cost, node in sorted(gains, reverse=True):
        if gain > 0 and spent + cost <= budget:
            chosen.append(node)
            spent += cost
    if chosen:
        final, quant = quantize(tower.fp32_dir, work / f"final-{tower.name}", preset, chosen)
        tower.use(final, quant, manifest)
        result = score()
        if result > baseline:
            return result
    tower.use(base_file, base_quant, manifest)
    return baseline


def _quantization(towers: list[Tower]) -> Quantization:
    first = towers[0].quantization
    return Quantization(
        method=first.method,
        preset=first.preset,
        weight_type=first.weight_type,
        per_channel=first.per_channel,
        nodes_excluded=[n for t in towers for n in t.quantization.nodes_excluded],
    )


def measure_speed(fp32: Path, converted: Path, pixels: np.ndarray, runs: int = 5) -> dict[str, int]:
    """Median microseconds per call of the vision model on a batch of sample images, fp32 vs
    the converted file, on this machine (the figure `report_table` shows)."""
    import statistics
    import time

    timings = {}
    for label, path in (("fp32_us", fp32), ("int8_us", converted)):
        session = create_session(path, RuntimeConfig())
        session.run(None, {"pixel_values": pixels})
        samples = []
        for _ in range(runs):
            start = time.perf_counter()
            session.run(None, {"pixel_values": pixels})
            samples.append(time.perf_counter() - start)
        timings[label] = int(statistics.median(samples) * 1e6)
    return timings


def sample_pixels(manifest: Manifest, count: int = 8) -> np.ndarray:
    pre = ImagePreprocessor.from_config(manifest.config["preprocessing"])
    return np.stack([pre(image) for image in sample_images()[:count]])


def _finish(
    stage_dir: Path,
    target: Path,
    manifest: Manifest,
    towers: list[Tower],
    validation: Validation,
    progress: Progress,
    force: bool,
) -> Manifest:
    """Record what was measured, refuse below the thresholds (unless forced), install."""
    manifest.validation = validation
    manifest.quantization = _quantization(towers)
    vision = towers[0]
    manifest.sizes = {
        "fp32_bytes": sum(t.fp32_bytes for t in towers),
        "int8_bytes": sum(t.int8_bytes for t in towers),
        **measure_speed(vision.fp32_dir / "model.onnx", vision.staged, sample_pixels(manifest)),
    }
    manifest.config["towers"] = {
        t.name: {
            "file": t.staged.name,
            "fp32_bytes": t.fp32_bytes,
            "int8_bytes": t.int8_bytes,
            "kept_fp32": t.quantization.nodes_excluded,
        }
        for t in towers
    }
    progress.console.print(report_table(manifest, validation))
    if not validation.passed and not force:
        report = ", ".join(f"{k} {v:.4f}" for k, v in validation.metrics.items())
        raise ExportError(
            f"The converted model disagrees with PyTorch beyond the thresholds ({report}; "
            f"need {validation.thresholds}). Nothing was written; --force writes it anyway."
        )
    write_manifest(stage_dir, manifest)
    install(stage_dir, target)
    return manifest


def _manifest(
    stage_dir: Path,
    *,
    slug: str,
    name: str | None,
    description: str,
    task: str,
    source: Path,
    checkpoint: dict[str, Any],
    files: dict[str, str],
    **fields: Any,
) -> Manifest:
    return Manifest(
        slug=slug,
        code=slug.upper().replace("-", "_").replace(".", "_"),
        name=name or str(checkpoint.get("_name_or_path") or source.name) or source.name,
        description=description,
        task=task,
        files={role: file_entry(stage_dir, file) for role, file in files.items()},
        exporter={"appliance": __version__, "libraries": library_versions()},
        source=str(source.resolve()),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **fields,
    )


# ---- the pipelines -------------------------------------------------------------------------


def export_clip(
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
    """A CLIP checkpoint -> two INT8 towers + tokenizer.json (zero-shot-image-classification)."""
    opts = PipelineOptions(options, console)
    template = str(options.get("prompt_template", PROMPT_TEMPLATE))
    if "{label}" not in template:
        raise ExportError(f"prompt_template {template!r} must contain {{label}}")
    progress = Progress(console)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".export-{slug}-", dir=out_dir))
    try:
        with progress("reading checkpoint"):
            config = read_config(source)
            if config.get("model_type") != "clip":
                raise ExportError(
                    f"{source} is a {config.get('model_type')!r} model; "
                    "zero-shot-image-classification takes CLIP checkpoints"
                )
            preprocessing = read_preprocessing(source)
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True)
            if not getattr(tokenizer, "is_fast", False):
                raise ExportError(f"{source}: the tokenizer cannot be converted to tokenizer.json")
            positions = config.get("text_config", {}).get("max_position_embeddings", 77)
            max_tokens = int(min(tokenizer.model_max_length, positions))
            pad_id = tokenizer.pad_token_id
            pad_id = tokenizer.eos_token_id if pad_id is None else pad_id
        with progress("exporting to ONNX (zero-shot-image-classification, split in towers)"):
            combined = _onnx_export(source, "zero-shot-image-classification", work / "onnx")
            fp32, logit_scale = split_clip(combined, work, source)
        preset = preset or cpu_preset()
        with progress(opts.step(preset)):
            converted = {t: opts.convert(d, work / f"int8-{t}", preset) for t, d in fp32.items()}
        with progress("packaging"):
            stage_dir = work / "model"
            stage_dir.mkdir()
            towers = [
                Tower("vision", fp32["vision"], stage_dir, "vision_model.onnx", "model"),
                Tower("text", fp32["text"], stage_dir, "text_model.onnx", "text_model"),
            ]
            for tower in towers:
                tower.use(*converted[tower.name], None)
            tokenizer.backend_tokenizer.save(str(stage_dir / "tokenizer.json"))
            manifest = _manifest(
                stage_dir,
                slug=slug,
                name=name,
                description=description,
                task="zero-shot-image-classification",
                source=source,
                checkpoint=config,
                files={
                    "model": "vision_model.onnx",
                    "text_model": "text_model.onnx",
                    "tokenizer": "tokenizer.json",
                },
                inputs=["pixel_values", "input_ids", "attention_mask"],
                outputs=["image_embeds", "text_embeds"],
                max_tokens=max_tokens,
                pad_token_id=int(pad_id or 0),
                dimension=int(config.get("projection_dim", 512)),
                normalize=True,
                example_payload={"image": example_image(), "labels": ["red square", "cat"]},
                config={
                    "preprocessing": preprocessing,
                    "visual_tokens": _visual_tokens(config.get("vision_config", {})),
                    "logit_scale": logit_scale,
                    "prompt_template": template,
                    "text_prompt_template": "{label}",
                },
            )
        with progress(f"validating {opts.precision.upper()} ONNX against PyTorch"):
            validator = ClipValidator(
                source,
                template,
                max_tokens,
                min_cosine=opts.min_cosine,
                min_agreement=opts.min_agreement,
            )
            validation = validator(stage_dir, manifest)
            for tower in towers if opts.searches else []:
                metric = "image" if tower.name == "vision" else "text"
                if validation.metrics[f"{metric}_min_cosine"] >= FIDELITY_GOAL:
                    continue

                def score(name: str = tower.name) -> float:
                    return validator.tower_score(stage_dir, manifest, name)

                baseline = validation.metrics[f"{metric}_mean_cosine"]
                keep_sensitive_layers(tower, work, preset, score, baseline, manifest)
                validation = validator(stage_dir, manifest)
        return _finish(stage_dir, out_dir / slug, manifest, towers, validation, progress, force)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def export_image_classifier(
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
    """A ViT-style AutoModelForImageClassification checkpoint -> one INT8 model, labels from
    config id2label (image-classification)."""
    opts = PipelineOptions(options, console)
    if "prompt_template" in options:
        raise ExportError("prompt_template is a CLIP option; image classifiers have labels")
    progress = Progress(console)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".export-{slug}-", dir=out_dir))
    try:
        with progress("reading checkpoint"):
            config = read_config(source)
            id2label = config.get("id2label") or {}
            labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
            if not labels:
                raise ExportError(f"{source}/config.json has no id2label: cannot name the classes.")
            multi_label = config.get("problem_type") == "multi_label_classification"
            preprocessing = read_preprocessing(source)
        with progress("exporting to ONNX (image-classification)"):
            _onnx_export(source, "image-classification", work / "fp32")
        preset = preset or cpu_preset()
        with progress(opts.step(preset)):
            converted = opts.convert(work / "fp32", work / "int8", preset)
        with progress("packaging"):
            stage_dir = work / "model"
            stage_dir.mkdir()
            tower = Tower("model", work / "fp32", stage_dir, "model.onnx", "model")
            tower.use(*converted, None)
            visual_tokens = _visual_tokens(config)
            manifest = _manifest(
                stage_dir,
                slug=slug,
                name=name,
                description=description,
                task="image-classification",
                source=source,
                checkpoint=config,
                files={"model": "model.onnx"},
                inputs=["pixel_values"],
                outputs=["logits"],
                max_tokens=visual_tokens,
                labels=labels,
                multi_label=multi_label,
                example_payload={"image": example_image()},
                config={"preprocessing": preprocessing, "visual_tokens": visual_tokens},
            )
        with progress(f"validating {opts.precision.upper()} ONNX against PyTorch"):
            validator = ClassifierValidator(
                source, multi_label, min_cosine=opts.min_cosine, min_agreement=opts.min_agreement
            )
            validation = validator(stage_dir, manifest)
            if opts.searches and validation.metrics["min_cosine"] < FIDELITY_GOAL:
                keep_sensitive_layers(
                    tower,
                    work,
                    preset,
                    lambda: validator(stage_dir, manifest).metrics["mean_cosine"],
                    validation.metrics["mean_cosine"],
                    manifest,
                )
                validation = validator(stage_dir, manifest)
        return _finish(stage_dir, out_dir / slug, manifest, [tower], validation, progress, force)
    finally:
        shutil.rmtree(work, ignore_errors=True)
