"""One runner per task kind, all over the shared runtime."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from appliance.models.manifest import Manifest
from appliance.tasks.base import ItemResult, Runner
from appliance.tasks.classify import ClassificationRunner
from appliance.tasks.embed import EmbeddingRunner

RUNNERS: dict[str, type[Runner]] = {
    cls.task: cls
    for cls in (EmbeddingRunner, ClassificationRunner)  # type: ignore[type-abstract]
}

__all__ = ["RUNNERS", "ItemResult", "Runner", "build_runner"]


def build_runner(folder: Path, manifest: Manifest, session: ort.InferenceSession) -> Runner:
    try:
        cls = RUNNERS[manifest.task]
    except KeyError:
        raise ValueError(
            f"task {manifest.task!r} is not served by this appliance "
            f"(served: {', '.join(sorted(RUNNERS))})"
        ) from None
    return cls(folder, manifest, session)
