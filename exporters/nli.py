"""zero-shot-classification: an NLI checkpoint (premise/hypothesis -> entailment, neutral,
contradiction) exported as a sequence classifier, served by the zero-shot runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from appliance.models.manifest import Manifest
from appliance.tasks.zero_shot import DEFAULT_TEMPLATE
from exporters.checkpoint import ExportError
from exporters.export import export_encoder
from exporters.tasks import TASKS, TaskSpec
from exporters.validate import Validator

SPEC = TaskSpec(
    "text-classification",
    "text-classification",
    "AutoModelForSequenceClassification",
    {"text": "I am really mad because my product broke.", "labels": ["product issue", "furniture"]},
)


def nli_label_ids(label2id: dict[str, int]) -> tuple[int, int]:
    """(entailment, contradiction) ids from the config's label2id, by name."""
    found: dict[str, int] = {}
    for label, index in label2id.items():
        for role in ("entail", "contra"):
            if label.lower().startswith(role):
                found[role] = int(index)
    if set(found) != {"entail", "contra"}:
        raise ExportError(
            f"not an NLI model: label2id {label2id} names no entailment and contradiction labels"
        )
    return found["entail"], found["contra"]


def export_nli(
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
    import json

    config = (
        json.loads((source / "config.json").read_text())
        if (source / "config.json").is_file()
        else {}
    )
    entail, contra = nli_label_ids(config.get("label2id") or {})
    template = options.get("hypothesis_template", DEFAULT_TEMPLATE)

    def adjust(manifest: Manifest) -> None:
        manifest.task = "zero-shot-classification"
        manifest.example_payload = dict(SPEC.example_payload)
        manifest.config |= {
            "entailment_id": entail,
            "contradiction_id": contra,
            "hypothesis_template": template,
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
        make_validator=lambda info: Validator(
            info,
            TASKS["text-classification"],
            min_cosine=float(options.get("min_cosine", 0.98)),
            min_agreement=float(options.get("min_agreement", 0.9)),
        ),
        adjust=adjust,
        precision=options.get("precision", "int8"),
    )
