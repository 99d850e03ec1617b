"""text-ranking: a cross-encoder (`*ForSequenceClassification` with one logit, ms-marco or
bge-reranker style) exported as a sequence classifier, validated on (query, document) pairs,
served by the rerank runner."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from appliance.config import RuntimeConfig
from appliance.models.manifest import Manifest, Validation
from appliance.runtime.session import create_session
from appliance.tasks.rerank import RerankInput, RerankRunner
from exporters.checkpoint import CheckpointInfo, ExportError, accepted_inputs
from exporters.export import export_encoder
from exporters.tasks import TaskSpec

SPEC = TaskSpec(
    "text-classification",
    "text-classification",
    "AutoModelForSequenceClassification",
    {"query": "What is the capital of France?", "texts": ["Paris is in France.", "Berlin."]},
)
SAMPLE_QUERIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "What is the capital of France?",
        (
            "Paris is the capital and largest city of France.",
            "Berlin is the capital of Germany.",
            "France is known for its wine and cheese.",
            "The Eiffel Tower was built for the 1889 World's Fair in Paris.",
            "Madrid is the capital of Spain.",
        ),
    ),
    (
        "how do I reset my password",
        (
            "Click 'Forgot password' on the sign-in page and follow the email link.",
            "Our office is open Monday to Friday.",
            "Passwords must have at least twelve characters.",
            "To change your email address, open the account settings.",
            "Resetting the router fixes most connection problems.",
        ),
    ),
    (
        "symptoms of dehydration",
        (
            "Thirst, dark urine, tiredness and dizziness are common signs of dehydration.",
            "Drinking water helps the body regulate its temperature.",
            "The stock market fell sharply on Tuesday.",
            "Severe dehydration can cause confusion and a rapid heartbeat.",
            "Cats sleep for up to sixteen hours a day.",
        ),
    ),
)
MIN_SPEARMAN = 0.9
MAX_SCORE_ERROR = 0.05


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two score lists (no ties in practice: float logits)."""
    ra, rb = a.argsort().argsort().astype(np.float64), b.argsort().argsort().astype(np.float64)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / np.sqrt((ra * ra).sum() * (rb * rb).sum()))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class RerankValidator:
    """PyTorch's logits for the sample pairs (transformers' tokenizer) against the INT8 model's
    through the appliance's own runner: rank agreement per query (Spearman) and the largest
    error of the sigmoid score the API returns."""

    def __init__(self, info: CheckpointInfo, *, min_spearman: float, max_score_error: float):
        import torch
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(info.folder)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(info.folder)
        self.reference = []
        for query, texts in SAMPLE_QUERIES:
            batch = tokenizer(
                [query] * len(texts),
                list(texts),
                padding=True,
                truncation=True,
                max_length=info.max_tokens,
                return_tensors="pt",
            )
            with torch.inference_mode():
                logits = model.eval()(**accepted_inputs(model.forward, batch)).logits
            self.reference.append(logits[:, 0].double().numpy())
        self.thresholds = {"spearman": min_spearman, "max_score_error": max_score_error}

    def __call__(self, folder: Path, manifest: Manifest) -> Validation:
        session = create_session(folder / "model.onnx", RuntimeConfig())
        runner = RerankRunner(folder, manifest, session)
        items = runner.preprocess([RerankInput(q, t) for q, t in SAMPLE_QUERIES])
        ours = runner.infer(items)
        rho = [spearman(o, r) for o, r in zip(ours, self.reference, strict=True)]
        error = max(
            float(np.abs(_sigmoid(o) - _sigmoid(r)).max())
            for o, r in zip(ours, self.reference, strict=True)
        )
        cos = [
            float(o @ r / (np.linalg.norm(o) * np.linalg.norm(r) + 1e-12))
            for o, r in zip(ours, self.reference, strict=True)
        ]
        metrics = {
            "spearman": float(np.mean(rho)),
            "min_spearman": float(np.min(rho)),
            "max_score_error": error,
            "min_cosine": float(np.min(cos)),
        }
        passed = metrics["spearman"] >= self.thresholds["spearman"] and (
            error <= self.thresholds["max_score_error"]
        )
        return Validation(
            samples=sum(len(t) for _, t in SAMPLE_QUERIES),
            metrics=metrics,
            thresholds=dict(self.thresholds),
            passed=passed,
        )


def export_reranker(
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
    config_file = source / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    labels = config.get("id2label") or {}
    if config.get("num_labels", len(labels)) != 1 and len(labels) != 1:
        raise ExportError(
            f"not a cross-encoder: {source.name} has {len(labels) or 'no'} output labels; "
            "text-ranking needs a *ForSequenceClassification checkpoint with one logit"
        )

    def adjust(manifest: Manifest) -> None:
        manifest.task = "text-ranking"
        manifest.labels = None
        manifest.example_payload = dict(SPEC.example_payload)

    return export_encoder(
        source,
        SPEC,
        out_dir=out_dir,
        slug=slug,
        name=name,
        description=description,
        preset=preset,
        force=force,
        console=console,
        make_validator=lambda info: RerankValidator(
            info,
            min_spearman=float(options.get("min_spearman", MIN_SPEARMAN)),
            max_score_error=float(options.get("max_score_error", MAX_SCORE_ERROR)),
        ),
        adjust=adjust,
        precision=options.get("precision", "int8"),
    )
