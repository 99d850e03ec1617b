"""The export tasks: which optimum task and which transformers class each maps to."""

from __future__ import annotations

from dataclasses import dataclass


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
            "feature-extraction",
            "feature-extraction",
            "AutoModel",
            {"text": "iPhone 12 128GB"},
        ),
        TaskSpec(
            "text-classification",
            "text-classification",
            "AutoModelForSequenceClassification",
            {"text": "Offre gratuite, cliquez ici"},
        ),
    )
}
