"""What the exporter needs to know about a checkpoint folder, read from its files."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_SENSIBLE_LENGTH = 100_000  # tokenizer_config says 1e30 when it does not know


class ExportError(Exception):
    """The export cannot go on; the message says why and what would work."""


@dataclass
class CheckpointInfo:
    folder: Path
    config: dict[str, Any]
    name: str
    max_tokens: int
    labels: list[str] | None
    multi_label: bool
    pooling: str
    normalize: bool
    dimension: int | None


def accepted_inputs(fn: Any, inputs: Any) -> dict[str, Any]:
    """The tokenizer outputs `fn` (a model's forward, or generate's model) takes: a tokenizer
    may add token_type_ids that BART and others refuse ("model_kwargs are not used")."""
    import inspect

    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(inputs)
    return {k: v for k, v in inputs.items() if k in params}


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file of a checkpoint, or {} when it is not there."""
    return json.loads(path.read_text()) if path.is_file() else {}


def read_config(folder: Path) -> dict[str, Any]:
    """The config.json of a local checkpoint folder; an ExportError says what is missing."""
    if not folder.is_dir():
        raise ExportError(
            f"{folder} is not a folder. Give a local Hugging Face checkpoint folder "
            "(this appliance is offline: hub ids are not fetched)."
        )
    config = read_json(folder / "config.json")
    if not config:
        raise ExportError(f"{folder} has no config.json: not a Hugging Face checkpoint folder.")
    return config


def slugify(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:64] or "model"


def _max_tokens(folder: Path, config: dict[str, Any]) -> int:
    st = read_json(folder / "sentence_bert_config.json").get("max_seq_length")
    if isinstance(st, int) and st > 0:
        return st
    tc = read_json(folder / "tokenizer_config.json").get("model_max_length")
    positions = config.get("max_position_embeddings")
    candidates = [
        v for v in (tc, positions) if isinstance(v, int | float) and 0 < v < MAX_SENSIBLE_LENGTH
    ]
    if not candidates:
        return 512
    if config.get("model_type") in {"roberta", "xlm-roberta", "camembert"} and positions:
        # RoBERTa reserves padding_idx + 1 positions.
        candidates.append(positions - 2)
    return int(min(candidates))


def _pooling(folder: Path) -> tuple[str, bool]:
    """Pooling and normalisation from a sentence-transformers folder; mean + L2 otherwise."""
    modules = read_json(folder / "modules.json") if (folder / "modules.json").is_file() else None
    if not isinstance(modules, list):
        return "mean", True
    normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    pooling = "mean"
    for m in modules:
        if str(m.get("type", "")).endswith("Pooling"):
            cfg = read_json(folder / m.get("path", "") / "config.json")
            if cfg.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif cfg.get("pooling_mode_max_tokens"):
                pooling = "max"
    return pooling, normalize


def inspect_checkpoint(folder: Path, task: str) -> CheckpointInfo:
    config = read_config(folder)
    labels: list[str] | None = None
    multi_label = False
    if task == "text-classification":
        id2label = config.get("id2label") or {}
        labels = [str(id2label[k]) for k in sorted(id2label, key=lambda k: int(k))]
        if not labels:
            raise ExportError(f"{folder}/config.json has no id2label: cannot name the classes.")
        multi_label = config.get("problem_type") == "multi_label_classification"
    pooling, normalize = _pooling(folder)
    return CheckpointInfo(
        folder=folder,
        config=config,
        name=str(config.get("_name_or_path") or folder.name) or folder.name,
        max_tokens=_max_tokens(folder, config),
        labels=labels,
        multi_label=multi_label,
        pooling=pooling,
        normalize=normalize,
        dimension=config.get("hidden_size") if task == "feature-extraction" else None,
    )
