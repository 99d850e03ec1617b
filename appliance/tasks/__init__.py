"""One runner per task kind, all over the shared runtime.

Runners are found by task name; each lives in its own module, imported only when a model of
that task is loaded.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import onnxruntime as ort

from appliance.models.manifest import Manifest
from appliance.tasks.base import ItemResult, Runner

# task -> "module:Class"
RUNNERS: dict[str, str] = {
    "feature-extraction": "appliance.tasks.embed:EmbeddingRunner",
    "text-classification": "appliance.tasks.classify:ClassificationRunner",
    "zero-shot-classification": "appliance.tasks.zero_shot:ZeroShotRunner",
    "question-answering": "appliance.tasks.qa:QuestionAnsweringRunner",
    "text-generation": "appliance.tasks.generate:GenerationRunner",
    "summarisation": "appliance.tasks.summarise:SummarisationRunner",
    "zero-shot-image-classification": "appliance.tasks.clip:ClipRunner",
    "image-classification": "appliance.tasks.image:ImageClassificationRunner",
    "custom": "appliance.tasks.custom:CustomRunner",
    "text-ranking": "appliance.tasks.rerank:RerankRunner",
}

__all__ = ["RUNNERS", "ItemResult", "Runner", "build_runner", "runner_class"]


def runner_class(task: str) -> type[Runner]:
    try:
        module, name = RUNNERS[task].split(":")
    except KeyError:
        raise ValueError(
            f"task {task!r} is not served by this appliance (served: {', '.join(sorted(RUNNERS))})"
        ) from None
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def build_runner(folder: Path, manifest: Manifest, session: ort.InferenceSession) -> Runner:
    return runner_class(manifest.task)(folder, manifest, session)
