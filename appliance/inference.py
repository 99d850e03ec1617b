"""The path of one inference request, shared by every API family:

rate limit (requests) -> resolve the model and check the key may use it -> parse inputs ->
cache lookup per item -> tokenise the misses -> quota and token rate limit (exact counts)
-> micro-batched model call -> cache store -> answer with what the headers need.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from appliance.config import LimitsConfig
from appliance.errors import Forbidden, ModelNotFound, ValidationFailed, WrongTask
from appliance.fallbacks import Fallbacks, Plan
from appliance.gateway.cache import ResponseCache, cache_key
from appliance.gateway.keys import ApiKey
from appliance.gateway.ratelimit import LimitState, RateLimiter
from appliance.gateway.usage import UsageLog
from appliance.models.registry import ModelEntry, Registry
from appliance.runtime.batcher import REALTIME
from appliance.runtime.tokenizer import INLINE_CHARS
from appliance.tasks import ItemResult

INLINE_ITEMS = 32
"""Up to this many items, cache lookups run on the event loop (one indexed SQLite read each,
microseconds): a hop to a worker thread and back costs more than the lookup."""


def _size(value: Any) -> int:
    """Characters of text in a parsed input; anything else (images, arrays) counts as big."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_size(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_size(v) for v in value)
    if dataclasses.is_dataclass(value):
        return sum(_size(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, (int, float, bool)) or value is None:
        return 1
    return INLINE_CHARS + 1


async def _prepare(runner: Any, inputs: list[Any], truncate: bool) -> list[Any]:
    if sum(_size(i) for i in inputs) <= INLINE_CHARS:
        return runner.preprocess(inputs, truncate=truncate)  # type: ignore[no-any-return]
    return await asyncio.to_thread(runner.preprocess, inputs, truncate=truncate)  # type: ignore[no-any-return]


@dataclass
class Call:
    """One API request: who calls, how the cache may be used, and (filled in as it runs)
    what the usage log records."""

    key: ApiKey
    read_cache: bool = True
    write_cache: bool = True
    model: str | None = None
    tokens: int = 0
    cache_status: str | None = None
    settled: asyncio.Future[None] | None = None
    """A stream's tokens are known only once its generation ends, which can be after the
    client went away: the request recorder waits for this before recording `tokens`."""

    @classmethod
    def for_request(cls, key: ApiKey, cache_control: str = "") -> Call:
        directives = {d.strip().lower() for d in cache_control.split(",")}
        if "no-store" in directives:
            return cls(key, read_cache=False, write_cache=False)
        return cls(key, read_cache="no-cache" not in directives)


@dataclass(frozen=True, slots=True)
class Outcome:
    model: ModelEntry
    results: list[ItemResult]
    latency_ms: float
    tokens: int
    cache_status: str  # HIT | MISS | BYPASS
    cache_key: str | None
    cache_age: int | None
    limits: LimitState

    @property
    def truncated(self) -> bool:
        return any(r.truncated for r in self.results)

    @property
    def cached(self) -> bool:
        return self.cache_status == "HIT"


@dataclass
class Inference:
    registry: Registry
    cache: ResponseCache
    limiter: RateLimiter
    usage: UsageLog
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    fallbacks: Fallbacks = field(default_factory=Fallbacks)

    def _rates(self, key: ApiKey) -> tuple[int, int]:
        return (
            key.requests_per_minute or self.limits.requests_per_minute,
            key.tokens_per_minute or self.limits.tokens_per_minute,
        )

    def check_budget(self, runner: Any, prepared: Sequence[Any]) -> None:
        """Refuse (422) a generation whose worst-case cache positions exceed the budget,
        before any model work: rows x positions is what its memory and time grow with."""
        positions = getattr(runner, "positions", None)
        if positions is None:
            return
        needed = sum(positions(p) for p in prepared)
        budget = self.limits.max_generation_positions
        if needed > budget:
            fields = list(runner.budget_fields)
            raise ValidationFailed(
                f"This request may need {needed} cache positions (rows: num_beams or "
                f"num_generations, times prompt tokens + max_length, over its texts); the "
                f"limit is {budget}. Lower {', '.join(fields[1:])} or shorten the text.",
                details={"fields": fields, "positions": needed, "max_positions": budget},
            )

    def model_for(
        self,
        ref: str,
        key: ApiKey,
        tasks: Collection[str] | None = None,
        endpoint: str | None = None,
    ) -> ModelEntry:
        entry = self.registry.resolve(ref, endpoint)
        if not key.allows_model(entry.slug):
            raise Forbidden(
                f"This API key may not use model '{entry.slug}'.", details={"model": entry.slug}
            )
        assert entry.manifest is not None
        if tasks is not None and entry.manifest.task not in tasks:
            raise WrongTask(
                f"Model '{entry.slug}' is a {entry.manifest.task} model; this endpoint needs "
                f"{' or '.join(sorted(tasks))}.",
                details={"model": entry.slug, "task": entry.manifest.task},
            )
        return entry

    def resolve(
        self,
        ref: str,
        key: ApiKey,
        tasks: Collection[str] | None = None,
        endpoint: str | None = None,
    ) -> tuple[ModelEntry, Plan | None]:
        """The model that answers, and the fallback plan when it stands in for a task no
        installed model has (appliance.fallbacks); errors say which export adds a model."""
        try:
            return self.model_for(ref, key, tasks, endpoint), None
        except (WrongTask, ModelNotFound) as exc:
            plan = self.fallbacks.plan(self.registry, ref, tasks, exc)
            if plan is None:
                raise self.fallbacks.explain(self.registry, tasks, exc) from None
        return self.model_for(plan.generator.slug, key), plan

    async def run(
        self,
        ref: str,
        payloads: Sequence[Any],
        *,
        call: Call,
        tasks: Collection[str] | None = None,
        truncate: bool = True,
        endpoint: str | None = None,
        priority: int = REALTIME,
    ) -> Outcome:
        """Run `payloads` (one input object each) on model `ref`. `tasks`: the model tasks the
        endpoint accepts; `endpoint`: its name, for per-endpoint aliases; `priority`: the
        micro-batcher's (batch jobs pass BACKGROUND so real-time requests go first)."""
        start = time.perf_counter()
        key = call.key
        rpm, tpm = self._rates(key)
        entry, plan = self.resolve(ref, key, tasks, endpoint)
        call.model = entry.slug
        await self.registry.ensure_loaded(entry)  # models.lazy: opened at the first request
        assert entry.runner is not None and entry.manifest is not None
        if plan is not None:
            payloads = await plan.prepare(payloads, truncate)
        inputs = [entry.runner.parse_input(p) for p in payloads]

        # A key per cacheable item (None: never cached, e.g. sampling without a seed).
        keys: list[str | None] = [None] * len(inputs)
        if self.cache.enabled and (call.read_cache or call.write_cache):
            m, runner, params = entry.manifest, entry.runner, {"truncate": truncate}
            if self.cache.scope == "key":  # no cross-key X-Cache: HIT side channel
                params["key"] = key.id
            keys = [
                cache_key(entry.slug, m.fingerprint, m.task, item, params)
                if runner.cacheable(item)
                else None
                for item in inputs
            ]
        cacheable = [k for k in keys if k is not None]
        hits = {}
        shared: set[str] = set()  # first-level misses, to look up in the second level
        if cacheable and call.read_cache:
            if len(cacheable) <= INLINE_ITEMS:
                hits = self.cache.get_local(cacheable)
                shared = {k for k in cacheable if k not in hits}
            else:
                hits = await asyncio.to_thread(self.cache.get_many, cacheable)
        # What the disk cache did not answer is tokenised now, so that its exact cost is known
        # for the one limit decision below (an answer the second level turns out to hold is
        # then not charged, only tokenised).
        runner = entry.runner
        pending = [i for i in range(len(inputs)) if keys[i] is None or keys[i] not in hits]
        prepared: dict[int, Any] = {}
        if pending:
            ready = await _prepare(runner, [inputs[i] for i in pending], truncate)
            self.check_budget(runner, ready)
            prepared = dict(zip(pending, ready, strict=True))
        costs = {i: runner.cost(p) for i, p in prepared.items()}
        looked = [i for i in pending if keys[i] in shared]
        unlooked = sum(costs[i] for i in pending if keys[i] not in shared)
        # The request limit, the second cache level (cluster mode) and the token charge: one
        # decision, one round trip.
        fetch = [keys[i] for i in looked]
        limits, blobs, charged = await self.limiter.aadmit_charge(
            key.id, rpm, tpm, unlooked, self.cache.shared_names(fetch), [costs[i] for i in looked]
        )
        if fetch and any(b is not None for b in blobs):
            hits.update(self.cache.absorb(fetch, blobs))  # type: ignore[arg-type]
        results = {
            i: ItemResult(hits[k].output, tokens=0, truncated=hits[k].truncated)
            for i, k in enumerate(keys)
            if k is not None and k in hits
        }
        misses = [i for i in pending if i not in results]
        tokens = 0
        if misses:
            computed, limits = await self._compute(
                entry,
                [prepared[i] for i in misses],
                [costs[i] for i in misses],
                key,
                charged,
                limits,
                priority,
            )
            results.update(zip(misses, computed, strict=True))
            tokens = sum(r.tokens for r in computed)
            fresh = {
                k: (results[i].output, results[i].truncated)
                for i in misses
                if (k := keys[i]) is not None
            }
            if fresh and call.write_cache:
                self.cache.set_many(fresh)  # queued for the cache's writer thread

        if not cacheable or not call.read_cache:
            status = "BYPASS"
        else:
            status = "MISS" if misses else "HIT"
        age = int(time.time() - min(h.created for h in hits.values())) if status == "HIT" else None
        # One item: its own key; a batch: a key over the items' keys.
        joined = None
        if cacheable:
            joined = cacheable[0] if len(keys) == 1 else cache_key("", "", "", keys, {})
        call.tokens, call.cache_status = tokens, status
        answers = [results[i] for i in range(len(inputs))]
        return Outcome(
            model=entry,
            results=plan.finish(answers) if plan is not None else answers,
            latency_ms=(time.perf_counter() - start) * 1000,
            tokens=tokens,
            cache_status=status,
            cache_key=joined[:16] if joined else None,
            cache_age=age,
            limits=limits,
        )

    async def tokenize(
        self,
        ref: str,
        texts: list[str],
        *,
        call: Call,
        add_special_tokens: bool = True,
        endpoint: str | None = None,
    ) -> Outcome:
        """Each text's tokens with the model's tokenizer (a result `{"tokens": [Token]}` per
        text). Admitted and checked as `run` is; no model call, so nothing cached or charged."""
        from appliance.runtime.tokenizer import TextTokenizer

        start = time.perf_counter()
        key = call.key
        rpm, tpm = self._rates(key)
        limits = await self.limiter.aadmit_request(key.id, rpm, tpm)
        entry = self.model_for(ref, key, None, endpoint)
        call.model, call.cache_status = entry.slug, "BYPASS"
        await self.registry.ensure_loaded(entry)
        tokenizer = getattr(entry.runner, "tokenizer", None)
        if not isinstance(tokenizer, TextTokenizer):
            assert entry.manifest is not None
            raise WrongTask(
                f"Model '{entry.slug}' ({entry.manifest.task}) has no text tokenizer to show.",
                details={"model": entry.slug, "task": entry.manifest.task},
            )
        if sum(len(t) for t in texts) <= INLINE_CHARS:
            rows = tokenizer.tokens(texts, add_special_tokens=add_special_tokens)
        else:
            rows = await asyncio.to_thread(
                tokenizer.tokens, texts, add_special_tokens=add_special_tokens
            )
        return Outcome(
            model=entry,
            results=[ItemResult({"tokens": row}, tokens=0) for row in rows],
            latency_ms=(time.perf_counter() - start) * 1000,
            tokens=0,
            cache_status="BYPASS",
            cache_key=None,
            cache_age=None,
            limits=limits,
        )

    async def _compute(
        self,
        entry: ModelEntry,
        prepared: list[Any],
        costs: list[int],
        key: ApiKey,
        reserved: int,
        limits: LimitState,
        priority: int = REALTIME,
    ) -> tuple[list[ItemResult], LimitState]:
        """Run items already tokenised and charged to the token limit (`reserved`): the quota
        first (402 gives the tokens back), then the model, then settle what was really used.
        Returns the results and the limits as charged (what the headers report)."""
        runner, batcher = entry.runner, entry.batcher
        assert runner is not None and batcher is not None
        rpm, tpm = self._rates(key)
        try:
            self.usage.reserve(key.id, key.token_quota, reserved)
        except Exception:
            self.limiter.settle_tokens(key.id, tpm, -reserved)
            raise
        try:
            raws = await batcher.submit(prepared, costs, priority=priority)
        except BaseException:
            self.usage.refund(key.id, reserved, key.token_quota)
            self.limiter.settle_tokens(key.id, tpm, -reserved)
            raise
        results = [runner.postprocess(p, r) for p, r in zip(prepared, raws, strict=True)]
        used = sum(r.tokens for r in results)
        if used != reserved:  # e.g. generation stopped early: bill what was really used
            self.usage.refund(key.id, reserved - used, key.token_quota)
            self.limiter.settle_tokens(key.id, tpm, used - reserved)
            limits = dataclasses.replace(
                limits, remaining_tokens=max(0, min(tpm, limits.remaining_tokens + reserved - used))
            )
        return results, limits

    async def stream(
        self,
        ref: str,
        payload: Any,
        *,
        call: Call,
        tasks: Collection[str] | None = None,
        truncate: bool = True,
        endpoint: str | None = None,
    ) -> tuple[ModelEntry, LimitState, Any]:
        """One input whose runner can report progress (`runner.watch`, e.g. text generation):
        checks, limits and charges as `run` does (never cached), then returns the model, the
        rate-limit state and an async iterator of events: {"event": "piece", "text": ...} as
        the model goes, then {"event": "done", "result": ItemResult} or {"event": "error",
        "error": exception}. Closing the iterator early stops the model's work on the input."""
        import threading

        key = call.key
        rpm, tpm = self._rates(key)
        limits = await self.limiter.aadmit_request(key.id, rpm, tpm)
        entry = self.model_for(ref, key, tasks, endpoint)
        call.model, call.cache_status = entry.slug, "BYPASS"
        await self.registry.ensure_loaded(entry)
        runner, batcher = entry.runner, entry.batcher
        assert runner is not None and batcher is not None
        watch = getattr(runner, "watch", None)
        if watch is None:
            raise ValidationFailed(
                f"Model '{entry.slug}' cannot stream its output.", details={"field": "stream"}
            )
        item = runner.parse_input(payload)
        [prepared] = await _prepare(runner, [item], truncate)
        self.check_budget(runner, [prepared])
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str] = asyncio.Queue()
        cancelled = threading.Event()
        # The runner calls back from the model's thread: hand each piece to the event loop.
        watch(
            prepared, lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece), cancelled
        )
        reserved = runner.cost(prepared)
        self.usage.reserve(key.id, key.token_quota, reserved)
        try:
            await self.limiter.aadmit_tokens(key.id, rpm, tpm, reserved)
        except Exception:
            self.usage.refund(key.id, reserved, key.token_quota)
            raise
        limits = self.limiter.state(key.id, rpm, tpm)
        call.settled = loop.create_future()

        def settle(used: int) -> None:
            if call.settled is None or call.settled.done():
                return
            call.tokens = used
            if used != reserved:
                self.usage.refund(key.id, reserved - used, key.token_quota)
                self.limiter.settle_tokens(key.id, tpm, used - reserved)
            call.settled.set_result(None)

        def settle_late(task: asyncio.Future[Any]) -> None:
            if call.settled is None or call.settled.done():
                return
            if task.cancelled() or task.exception() is not None:
                settle(0)
            else:
                settle(runner.postprocess(prepared, task.result()[0]).tokens)

        # Submitted now, not when the events are first read: the work is settled (and the
        # request recorded) when it ends however the response goes, even a response that is
        # dropped before it starts.
        task = asyncio.ensure_future(batcher.submit([prepared], [reserved]))
        task.add_done_callback(settle_late)

        async def events() -> Any:
            try:
                while not task.done():
                    getter = asyncio.ensure_future(pieces.get())
                    await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                    if getter.done():
                        yield {"event": "piece", "text": getter.result()}
                    else:
                        getter.cancel()
                while not pieces.empty():
                    yield {"event": "piece", "text": pieces.get_nowait()}
                try:
                    raws = task.result()
                except Exception as exc:
                    settle(0)
                    yield {"event": "error", "error": exc}
                    return
                result = runner.postprocess(prepared, raws[0])
                settle(result.tokens)
                yield {"event": "done", "result": result}
            finally:
                if not task.done():  # the client went away: stop generating, bill what ran
                    cancelled.set()

        return entry, limits, events()
