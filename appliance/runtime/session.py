"""onnxruntime sessions with providers taken from config, in order, falling back with a warning."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnxruntime as ort

from appliance.config import RuntimeConfig

log = logging.getLogger("appliance.runtime")


def choose_providers(requested: list[str]) -> list[str]:
    available = set(ort.get_available_providers())
    chosen = [p for p in requested if p in available]
    missing = [p for p in requested if p not in available]
    if missing:
        log.warning("execution providers not available here, skipped: %s", ", ".join(missing))
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def create_session(path: Path, config: RuntimeConfig) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.intra_op_threads or (os.cpu_count() or 1)
    options.inter_op_num_threads = config.inter_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = choose_providers(config.providers)
    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    # onnxruntime-gpu lists CUDA even without a GPU and silently runs on CPU: check what it chose.
    actual = session.get_providers()
    if providers[0] not in actual:
        log.warning(
            "%s: asked for %s, running on %s", path.parent.name, providers[0], ", ".join(actual)
        )
    return session
