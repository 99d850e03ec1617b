"""Custom models: any ONNX graph whose manifest declares its inputs and outputs. Request
fields map to inputs by name (nested lists become tensors of the declared type and rank);
every output comes back as JSON. Items run one at a time: shapes are the model's business."""

from __future__ import annotations

from typing import Any

import numpy as np

from appliance.errors import ValidationFailed
from appliance.tasks.base import ItemResult, Runner

DTYPES = {
    "float32": np.float32, "float16": np.float16, "float64": np.float64, "int64": np.int64,
    "int32": np.int32, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_, "string": np.object_,
}  # fmt: skip
MAX_ELEMENTS = 10_000_000


def to_tensor(name: str, value: Any, spec: dict[str, Any]) -> np.ndarray:
    dtype = DTYPES[spec["dtype"]]
    try:
        array = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError, OverflowError):
        raise ValidationFailed(
            f"`{name}` must be a (nested list of) {spec['dtype']} values.", details={"field": name}
        ) from None
    if array.size > MAX_ELEMENTS:
        raise ValidationFailed(f"`{name}` is too large.", details={"field": name})
    shape = spec.get("shape") or []
    if len(shape) == array.ndim + 1 and (not isinstance(shape[0], int) or shape[0] in (1, -1)):
        array = array[None]  # a single item for a model with a batch dimension
    if len(shape) != array.ndim:
        raise ValidationFailed(
            f"`{name}` must have {len(shape)} dimensions {shape}; got shape {list(array.shape)}.",
            details={"field": name, "shape": shape},
        )
    for want, got in zip(shape, array.shape, strict=True):
        if isinstance(want, int) and want > 0 and want != got:
            raise ValidationFailed(
                f"`{name}` must have shape {shape}; got {list(array.shape)}.",
                details={"field": name, "shape": shape},
            )
    return array


class CustomRunner(Runner[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]):
    task = "custom"

    @property
    def input_specs(self) -> list[dict[str, Any]]:
        return list(self.manifest.config.get("inputs", []))

    def parse_input(self, payload: Any) -> dict[str, np.ndarray]:
        if not isinstance(payload, dict):
            raise ValidationFailed("`input` must be an object.", details={"field": "input"})
        feeds = {}
        for spec in self.input_specs:
            name = spec["name"]
            if name not in payload:
                raise ValidationFailed(
                    f"`{name}` is required by this model.",
                    details={"field": name, "inputs": self.input_specs},
                )
            feeds[name] = to_tensor(name, payload[name], spec)
        return feeds

    def preprocess(
        self, inputs: list[dict[str, np.ndarray]], *, truncate: bool = True
    ) -> list[dict[str, np.ndarray]]:
        return inputs

    def cost(self, item: dict[str, np.ndarray]) -> int:
        return 0  # no tokenizer: custom models are limited by requests, not tokens

    def infer(self, batch: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        names = [o.name for o in self.session.get_outputs()]
        return [dict(zip(names, self.session.run(None, feeds), strict=True)) for feeds in batch]

    def postprocess(self, item: dict[str, np.ndarray], raw: dict[str, np.ndarray]) -> ItemResult:
        values = {name: value.tolist() for name, value in raw.items()}
        output = next(iter(values.values())) if len(values) == 1 else values
        return ItemResult({"output": output}, tokens=0)

    def warmup(self) -> None:
        if self.manifest.example_payload:
            self.infer(self.preprocess([self.parse_input(self.manifest.example_payload)]))
