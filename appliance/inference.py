"""The path of one inference request, shared by every API family: resolve the model, check the
key may use it, parse and tokenise the inputs, queue them on the model's batcher, format."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from appliance.errors import Forbidden, WrongTask
from appliance.gateway.keys import ApiKey
from appliance.models.registry import ModelEntry, Registry
from appliance.tasks import ItemResult


@dataclass(frozen=True, slots=True)
class Outcome:
    model: ModelEntry
    results: list[ItemResult]
    latency_ms: float

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.results)

    @property
    def truncated(self) -> bool:
        return any(r.truncated for r in self.results)


class Inference:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def model_for(
        self, ref: str, key: ApiKey, tasks: Collection[str] | None = None
    ) -> ModelEntry:
        entry = self.registry.resolve(ref)
        if not key.allows_model(entry.slug):
            raise Forbidden(
                f"This API key may not use model '{entry.slug}'.",
                details={"model": entry.slug},
            )
        assert entry.manifest is not None
        if tasks is not None and entry.manifest.task not in tasks:
            raise WrongTask(
                f"Model '{entry.slug}' is a {entry.manifest.task} model; this endpoint needs "
                f"{' or '.join(sorted(tasks))}.",
                details={"model": entry.slug, "task": entry.manifest.task},
            )
        return entry

    async def run(
        self,
        ref: str,
        payloads: Sequence[Any],
        *,
        key: ApiKey,
        tasks: Collection[str] | None = None,
        truncate: bool = True,
    ) -> Outcome:
        start = time.perf_counter()
        entry = self.model_for(ref, key, tasks)
        runner, batcher = entry.runner, entry.batcher
        assert runner is not None and batcher is not None
        inputs = [runner.parse_input(p) for p in payloads]
        # Tokenising a batch of long texts takes milliseconds: keep it off the event loop.
        prepared = await asyncio.to_thread(runner.preprocess, inputs, truncate=truncate)
        raws = await batcher.submit(prepared, [runner.cost(p) for p in prepared])
        results = [runner.postprocess(p, r) for p, r in zip(prepared, raws, strict=True)]
        return Outcome(entry, results, (time.perf_counter() - start) * 1000)
