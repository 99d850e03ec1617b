"""question-answering: an extractive encoder with start/end logits. Fidelity is measured on
the logits themselves (cosine, and agreement of the most likely start and end tokens) for
fixed question/context pairs tokenised by transformers' tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from appliance.models.manifest import Manifest, Validation
from exporters.checkpoint import CheckpointInfo, accepted_inputs
from exporters.export import export_encoder
from exporters.tasks import TaskSpec
from exporters.validate import cosine_rows

SPEC = TaskSpec(
    "question-answering",
    "question-answering",
    "AutoModelForQuestionAnswering",
    {"question": "What is the meaning of life?", "context": "The meaning of life is 42."},
)

SAMPLES = [
    ("What is the meaning of life?", "The meaning of life is 42."),
    ("Where does the queen live?", "The queen lives in a large palace in London with her dogs."),
    (
        "When was the match played?",
        "It rained all day, so the football match was postponed until Sunday.",
    ),
    (
        "Who sells sea shells?",
        "She sells sea shells by the sea shore; the shells she sells are surely sea shells.",
    ),
    (
        "What fell sharply?",
        "Stock markets fell sharply after the central bank raised interest rates.",
    ),
    (
        "What can be compressed?",
        "Machine learning models can be compressed with 8-bit quantisation.",
    ),
    (
        "Why was the patient admitted?",
        "The patient was admitted with chest pain and shortness of breath.",
    ),
    ("What is the error?", "Error 404: the requested page could not be found on this server!"),
]


class QaValidator:
    def __init__(self, info: CheckpointInfo, *, min_cosine: float, min_agreement: float) -> None:
        import torch
        from transformers import AutoModelForQuestionAnswering, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(info.folder)
        model = AutoModelForQuestionAnswering.from_pretrained(info.folder).eval()
        self.batch = tokenizer(
            [q for q, _ in SAMPLES],
            [c for _, c in SAMPLES],
            padding=True,
            truncation="only_second",
            max_length=info.max_tokens,
            return_tensors="np",
        )
        with torch.inference_mode():
            batch = {k: torch.from_numpy(v) for k, v in self.batch.items()}
            out = model(**accepted_inputs(model.forward, batch))
        self.reference = (out.start_logits.numpy(), out.end_logits.numpy())
        self.thresholds = {"min_cosine": min_cosine, "argmax_agreement": min_agreement}

    def __call__(self, folder: Path, manifest: Manifest) -> Validation:
        from appliance.config import RuntimeConfig
        from appliance.runtime.session import create_session

        session = create_session(folder / "model.onnx", RuntimeConfig())
        names = {i.name for i in session.get_inputs()}
        feeds = {k: v.astype(np.int64) for k, v in self.batch.items() if k in names}
        outputs = dict(
            zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True)
        )
        mask = self.batch["attention_mask"].astype(bool)
        cos, agree = [], []
        for ours, ref in (
            (outputs["start_logits"], self.reference[0]),
            (outputs["end_logits"], self.reference[1]),
        ):
            ours, ref = np.where(mask, ours, 0.0), np.where(mask, ref, 0.0)
            cos.extend(cosine_rows(ours.astype(np.float64), ref.astype(np.float64)))
            agree.extend(
                np.argmax(np.where(mask, ours, -1e9), 1) == np.argmax(np.where(mask, ref, -1e9), 1)
            )
        metrics = {
            "min_cosine": float(np.min(cos)),
            "mean_cosine": float(np.mean(cos)),
            "argmax_agreement": float(np.mean(agree)),
        }
        passed = all(metrics[k] >= v for k, v in self.thresholds.items())
        return Validation(
            samples=len(SAMPLES), metrics=metrics, thresholds=dict(self.thresholds), passed=passed
        )


def export_qa(
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
    def adjust(manifest: Manifest) -> None:
        manifest.config |= {
            "doc_stride": int(options.get("doc_stride", min(128, manifest.max_tokens // 4))),
            "max_answer_tokens": int(options.get("max_answer_tokens", 15)),
            "min_answer_score": float(options.get("min_answer_score", 0.0)),
        }

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
        make_validator=lambda info: QaValidator(
            info,
            min_cosine=float(options.get("min_cosine", 0.98)),
            min_agreement=float(options.get("min_agreement", 0.9)),
        ),
        adjust=adjust,
        precision=options.get("precision", "int8"),
    )
