"""The export tasks. Encoder tasks share the pipeline in exporters.export; the others have
their own pipeline module (a function with the signature of `Pipeline`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console

from appliance.models.manifest import Manifest


@dataclass(frozen=True)
class TaskSpec:
    name: str
    optimum_task: str
    auto_class: str
    example_payload: dict[str, object]


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "feature-extraction", "feature-extraction", "AutoModel", {"text": "iPhone 12 128GB"}
        ),
        TaskSpec(
            "text-classification",
            "text-classification",
            "AutoModelForSequenceClassification",
            {"text": "Offre gratuite, cliquez ici"},
        ),
    )
}


class Pipeline(Protocol):
    def __call__(
        self,
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
    ) -> Manifest: ...


# task -> "module:function" implementing Pipeline, imported only when used.
PIPELINES: dict[str, str] = {
    "zero-shot-classification": "exporters.nli:export_nli",
    "question-answering": "exporters.qa:export_qa",
    "text-generation": "exporters.generation:export_generation",
    "summarisation": "exporters.seq2seq:export_seq2seq",
    "zero-shot-image-classification": "exporters.vision:export_clip",
    "image-classification": "exporters.vision:export_image_classifier",
    "custom": "exporters.custom:export_custom",
    "text-ranking": "exporters.rerank:export_reranker",
}

ALL_TASKS = (*TASKS, *PIPELINES)
