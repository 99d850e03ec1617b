"""Fidelity: the INT8 ONNX model, run through the appliance's own runner (its tokenizer,
padding, pooling), against the PyTorch original run through transformers' own tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from appliance.config import RuntimeConfig
from appliance.models.manifest import Manifest, Validation
from appliance.runtime.session import create_session
from appliance.tasks import build_runner
from exporters.checkpoint import CheckpointInfo, accepted_inputs
from exporters.samples import SAMPLE_TEXTS
from exporters.tasks import TaskSpec


def appliance_outputs(folder: Path, manifest: Manifest, texts: list[str]) -> np.ndarray:
    """What the server would answer for each text: the vector, or the label probabilities."""
    runner = build_runner(folder, manifest, create_session(folder / "model.onnx", RuntimeConfig()))
    items = runner.preprocess([runner.parse_input({"text": t}) for t in texts])
    outputs = [
        runner.postprocess(i, r).output for i, r in zip(items, runner.infer(items), strict=True)
    ]
    return np.stack(
        [
            np.array(o["vector"]) if "vector" in o else np.array(list(o["probabilities"].values()))
            for o in outputs
        ]
    )


def torch_outputs(info: CheckpointInfo, spec: TaskSpec, texts: list[str]) -> np.ndarray:
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(info.folder)
    model = getattr(transformers, spec.auto_class).from_pretrained(info.folder).eval()
    batch = tokenizer(
        texts, padding=True, truncation=True, max_length=info.max_tokens, return_tensors="pt"
    )
    with torch.inference_mode():
        out = model(**accepted_inputs(model.forward, batch))
    if spec.name == "feature-extraction":
        hidden = out.last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        if info.pooling == "cls":
            vec = hidden[:, 0]
        elif info.pooling == "max":
            vec = hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values
        else:
            vec = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if info.normalize:
            vec = torch.nn.functional.normalize(vec, dim=-1)
        return vec.numpy()
    logits = out.logits.double()
    probs = torch.sigmoid(logits) if info.multi_label else torch.softmax(logits, dim=-1)
    return probs.numpy()


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


class Validator:
    """Computes the PyTorch reference once, then scores any number of candidate INT8 files."""

    def __init__(
        self, info: CheckpointInfo, spec: TaskSpec, *, min_cosine: float, min_agreement: float
    ) -> None:
        self.texts = list(SAMPLE_TEXTS)
        self.spec = spec
        self.reference = torch_outputs(info, spec, self.texts).astype(np.float64)
        self.thresholds = {"min_cosine": min_cosine}
        if spec.name == "text-classification":
            self.thresholds["argmax_agreement"] = min_agreement

    def __call__(self, folder: Path, manifest: Manifest) -> Validation:
        ours = appliance_outputs(folder, manifest, self.texts).astype(np.float64)
        ref = self.reference
        cos = cosine_rows(ours, ref)
        metrics = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}
        if self.spec.name == "text-classification":
            metrics["argmax_agreement"] = float((ours.argmax(-1) == ref.argmax(-1)).mean())
            metrics["max_abs_diff"] = float(np.abs(ours - ref).max())
        passed = all(metrics[k] >= v for k, v in self.thresholds.items())
        return Validation(
            samples=len(self.texts),
            metrics=metrics,
            thresholds=dict(self.thresholds),
            passed=passed,
        )
