"""Running a pipeline: its steps in waves (a step waits only for the steps it refers to),
each answered by its endpoint's work function as a batch-job line is."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from typing import Any

import msgspec
from litestar.serialization import encode_json

from appliance.api.tasks import Endpoint, Work
from appliance.errors import ApplianceError, Overloaded, ValidationFailed
from appliance.inference import Call, Outcome
from appliance.jobs.endpoints import JOB_ENDPOINTS, JobEndpoint
from appliance.jobs.worker import decode_line
from appliance.pipelines.spec import (
    JOB_PREFIX,
    Pipeline,
    Reference,
    Step,
    parse_reference,
    references,
)
from appliance.runtime.batcher import REALTIME


def _missing(ref: Reference, step: str, at: str, what: str) -> ValidationFailed:
    details: dict[str, Any] = {"step": step, "reference": ref.text}
    if ref.step is None and ref.path:
        details["field"] = ref.path[0]
    return ValidationFailed(f"Step '{step}': '{ref.text}': {what}.", details=details)


def resolve(ref: Reference, given: dict[str, Any], done: dict[str, Any], step: str) -> Any:
    value: Any = given if ref.step is None else done[ref.step]
    for depth, part in enumerate(ref.path):
        at = ".".join(ref.path[:depth])
        if isinstance(value, dict):
            if part not in value:
                where = f"'{at}'" if at else ("the input" if ref.step is None else "the response")
                raise _missing(ref, step, at, f"{where} has no field '{part}'")
            value = value[part]
        elif isinstance(value, list):
            if not part.isdigit() or int(part) >= len(value):
                raise _missing(ref, step, at, f"'{at}' is a list of {len(value)}; no item '{part}'")
            value = value[int(part)]
        else:
            raise _missing(ref, step, at, f"'{at or 'the value'}' is not an object or a list")
    return value


def fill(value: Any, given: dict[str, Any], done: dict[str, Any], step: str) -> Any:
    """A step input with every reference replaced by the value it names."""
    if isinstance(value, dict):
        return {k: fill(v, given, done, step) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, given, done, step) for v in value]
    ref = parse_reference(value, step)
    return value if ref is None else resolve(ref, given, done, step)


def depends_on(step: Step) -> set[str]:
    return {r.step for _, r in references(step.input, step.name) if r.step is not None}


def waves(p: Pipeline) -> list[list[Step]]:
    """The steps grouped so that each group only needs the groups before it."""
    level: dict[str, int] = {}
    for step in p.steps:  # references point backwards (validate), so one pass suffices
        level[step.name] = 1 + max((level[d] for d in depends_on(step)), default=-1)
    groups: list[list[Step]] = [[] for _ in range(max(level.values()) + 1)]
    for step in p.steps:
        groups[level[step.name]].append(step)
    return groups


@dataclass
class StepResult:
    response: Any
    call: Call
    outcome: Outcome | None
    error: ApplianceError | None = None


@dataclass
class PipelineRun:
    output: Any
    steps: dict[str, Any]
    tokens: int
    latency_ms: float
    results: list[StepResult]

    def body(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "steps": self.steps,
            "tokens": self.tokens,
            "latency_ms": round(self.latency_ms, 2),
        }

    @property
    def cache_status(self) -> str:
        statuses = {r.call.cache_status or "BYPASS" for r in self.results}
        if statuses == {"HIT"}:
            return "HIT"
        return "BYPASS" if statuses == {"BYPASS"} else "MISS"


async def _answer(target: JobEndpoint, body: Any, work: Work) -> tuple[Any, Outcome | None]:
    """A step's answer. In a batch job (BACKGROUND priority), a full model queue is waited
    out, as for a job line; a real-time request gets the 503."""
    delay = 0.05
    while True:
        try:
            return await target.endpoint.run(body, work)
        except Overloaded:
            if work.priority == REALTIME:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def run_step(
    step: Step, given: dict[str, Any], done: dict[str, Any], work: Work
) -> StepResult:
    target = JOB_ENDPOINTS[step.endpoint]
    # Each step has its own Call, so that its tokens and cache status are its own.
    call = Call(work.call.key, read_cache=work.call.read_cache, write_cache=work.call.write_cache)
    try:
        filled = fill(step.input, given, done, step.name)
        body = decode_line(encode_json(filled), target, None, None)
        answer, outcome = await _answer(target, body, replace(work, call=call))
    except ApplianceError as exc:
        # The step's own error (status, code, message), saying which step it was.
        exc.details = {**exc.details, "step": step.name}
        return StepResult(None, call, None, exc)
    return StepResult(msgspec.to_builtins(answer), call, outcome)


async def run_pipeline(p: Pipeline, given: Any, work: Work) -> PipelineRun:
    """Run `p` on the input `given` as `work.call`'s key. The request's Call ends with the
    tokens of every step that ran (failed or not) and the combined cache status."""
    if not isinstance(given, dict):
        raise ValidationFailed(
            "The pipeline's input must be a JSON object (its fields are `$.input.FIELD`).",
            details={"field": "data"},
        )
    start = time.perf_counter()
    done: dict[str, Any] = {}
    results: list[StepResult] = []
    work.call.model = f"pipeline:{p.name}"
    try:
        for group in waves(p):
            ran = await asyncio.gather(*(run_step(s, given, done, work) for s in group))
            results.extend(ran)
            # The first failure in the declared order answers: the same one on every run.
            if (failed := next((r.error for r in ran if r.error is not None), None)) is not None:
                raise failed
            done.update((s.name, r.response) for s, r in zip(group, ran, strict=True))
    finally:
        work.call.tokens = sum(r.call.tokens for r in results)
    last = p.steps[-1].name
    run = PipelineRun(
        output=done[last],
        steps={s.name: done[s.name] for s in p.steps},
        tokens=work.call.tokens,
        latency_ms=(time.perf_counter() - start) * 1000,
        results=results,
    )
    work.call.cache_status = run.cache_status
    return run


def job_endpoint(p: Pipeline) -> JobEndpoint:
    """A pipeline as a batch-job endpoint: each line is one input, answered as POST
    /pipelines/NAME answers it."""

    async def run(body: Any, work: Work) -> tuple[Any, None]:
        return (await run_pipeline(p, body, work)).body(), None

    return JobEndpoint(f"{JOB_PREFIX}{p.name}", Endpoint(dict[str, Any], run), "pipelines")
