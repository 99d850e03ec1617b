"""Saved pipelines: named chains (or DAGs) of steps, each the body of one of the appliance's
endpoints, whose string values may refer to the pipeline's input (`"$.input.FIELD"`) or to an
earlier step's response (`"$.steps.STEP.FIELD.sub.0"`: dotted paths, list indexes).

A step runs exactly as a batch-job line of its endpoint does: the same body type and work
function (appliance.jobs.endpoints), so it goes through the one Inference path and is
charged tokens and cached like a request of its own. A step may only refer to steps before
it, so the declared order is already a topological order and no cycle can be saved; steps
that do not depend on each other run concurrently.

Checked at creation: names, endpoints, the step input's fields against the endpoint's body,
references to unknown or later steps, and the first field of a step reference against the
endpoint's typed response (where its work function declares a Struct). What lies deeper (a
dict's keys, a list's length) and the fields of `$.input` are only known at run time: a
missing one is a 422 naming the step and the reference."""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
import typing
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import msgspec
from litestar.serialization import encode_json

from appliance.api.tasks import Endpoint, Work
from appliance.classifiers import NAME, Owner
from appliance.errors import (
    ApplianceError,
    Conflict,
    Forbidden,
    NotFound,
    Overloaded,
    ValidationFailed,
)
from appliance.inference import Call, Outcome
from appliance.jobs.endpoints import JOB_ENDPOINTS, JobEndpoint
from appliance.jobs.worker import decode_line
from appliance.runtime.batcher import REALTIME

MAX_STEPS = 32
REFERENCE = re.compile(r"^\$\.(?P<root>[A-Za-z_][A-Za-z0-9_-]*)(?P<rest>.*)$")
JOB_PREFIX = "/pipelines/"
"""A batch job's endpoint `/pipelines/NAME` runs pipeline NAME once per line."""


class Step(msgspec.Struct, kw_only=True):
    name: str
    """Unique within the pipeline; later steps refer to its response as `$.steps.NAME`."""
    endpoint: str
    """The path of an endpoint a batch job may run, e.g. /v1/summarisation."""
    input: dict[str, Any] = msgspec.field(default_factory=dict)
    """The endpoint's request body; string values `$.input.F` / `$.steps.S.F` are references."""


class Pipeline(msgspec.Struct, kw_only=True):
    name: str
    steps: list[Step]
    description: str = ""
    created_at: str = ""
    owner: str | None = None
    """The key id that saved it; None: shared (saved by an admin key)."""


class _File(msgspec.Struct):
    pipelines: list[Pipeline] = msgspec.field(default_factory=list)


class PipelineLimit(ValidationFailed):
    code = "PIPELINE_LIMIT"


# ---- references ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Reference:
    text: str
    """As written, for messages."""
    step: str | None
    """None: the pipeline's input."""
    path: tuple[str, ...]


def _segments(rest: str) -> tuple[str, ...]:
    # "a.b[0].c" and "a.b.0.c" are the same path.
    rest = re.sub(r"\[(\d+)\]", r".\1", rest)
    if rest and not rest.startswith("."):
        return ("",)  # "$.inputx": no separator, caught as an empty segment
    parts = tuple(rest[1:].split(".")) if rest else ()
    return parts


def parse_reference(value: Any, where: str) -> Reference | None:
    """A string that is a reference, parsed; None for any other value. A string that starts
    with `$.` but names neither `input` nor `steps` is refused, since it is most likely a typo."""
    if not isinstance(value, str) or not value.startswith("$."):
        return None
    m = REFERENCE.match(value)
    parts = _segments(m["rest"]) if m else ("",)
    if m is None or m["root"] not in ("input", "steps") or "" in parts:
        raise ValidationFailed(
            f"{where}: '{value}' is not a reference; write \"$.input.FIELD\" or "
            '"$.steps.STEP.FIELD" (dotted paths, list indexes as numbers).',
            details={"field": where, "reference": value},
        )
    if m["root"] == "input":
        return Reference(value, None, parts)
    if not parts:
        raise ValidationFailed(
            f'{where}: \'{value}\' names no step; write "$.steps.STEP" or "$.steps.STEP.FIELD".',
            details={"field": where, "reference": value},
        )
    return Reference(value, parts[0], parts[1:])


def references(value: Any, where: str) -> list[tuple[str, Reference]]:
    """Every reference in a step input value, with where it is (e.g. `steps[1].input.text`, as
    litestar names the fields of a body)."""
    if isinstance(value, dict):
        return [r for k, v in value.items() for r in references(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [r for i, v in enumerate(value) for r in references(v, f"{where}[{i}]")]
    ref = parse_reference(value, where)
    return [(where, ref)] if ref is not None else []


def response_type(endpoint: Endpoint) -> Any:
    """The answer type an endpoint's work function declares (None when it cannot be read)."""
    try:
        hints = typing.get_type_hints(endpoint.run)
    except Exception:  # an unresolvable annotation: the fields are checked at run time
        return None
    args = typing.get_args(hints.get("return"))
    return args[0] if args else None


def known_fields(endpoint: Endpoint) -> tuple[str, ...] | None:
    """The top-level fields of an endpoint's response, when its type is a Struct."""
    kind = response_type(endpoint)
    if isinstance(kind, type) and issubclass(kind, msgspec.Struct):
        return kind.__struct_fields__
    return None


# ---- validation ------------------------------------------------------------------------------
def _body_fields(body: Any) -> tuple[set[str], set[str]] | None:
    """(all fields, required fields) of a Struct body type; None for other types."""
    if not (isinstance(body, type) and issubclass(body, msgspec.Struct)):
        return None
    fields = msgspec.structs.fields(body)
    return {f.encode_name for f in fields}, {f.encode_name for f in fields if f.required}


def step_endpoint(path: str, where: str) -> JobEndpoint:
    target = JOB_ENDPOINTS.get(path)
    if target is None:
        raise ValidationFailed(
            f"{where}: a pipeline step cannot call '{path}'; it may call "
            f"{', '.join(JOB_ENDPOINTS)}.",
            details={"field": where, "endpoint": path, "allowed": list(JOB_ENDPOINTS)},
        )
    return target


def validate(p: Pipeline) -> None:
    """Refuse (422, naming the offending field) what would fail every run."""
    if not NAME.match(p.name):
        raise ValidationFailed(
            "`name` must be 1-64 lowercase letters, digits, '-' or '_', starting with a letter "
            "or digit.",
            details={"field": "name"},
        )
    if not p.steps or len(p.steps) > MAX_STEPS:
        raise ValidationFailed(
            f"`steps` must hold 1 to {MAX_STEPS} steps.", details={"field": "steps"}
        )
    position: dict[str, int] = {}
    for i, step in enumerate(p.steps):
        where = f"steps[{i}]"
        if not NAME.match(step.name):
            raise ValidationFailed(
                f"`{where}.name` must be 1-64 lowercase letters, digits, '-' or '_', starting "
                "with a letter or digit.",
                details={"field": f"{where}.name"},
            )
        if step.name in position:
            raise ValidationFailed(
                f"`{where}.name`: two steps are named '{step.name}'; step names must be unique.",
                details={"field": f"{where}.name", "step": step.name},
            )
        position[step.name] = i
    for i, step in enumerate(p.steps):
        where = f"steps[{i}]"
        target = step_endpoint(step.endpoint, f"{where}.endpoint")
        fields = _body_fields(target.endpoint.body)
        if fields is not None:
            allowed, required = fields
            if unknown := sorted(set(step.input) - allowed):
                raise ValidationFailed(
                    f"`{where}.input`: {step.endpoint} takes no field '{unknown[0]}'; its "
                    f"fields are {', '.join(sorted(allowed))}.",
                    details={"field": f"{where}.input.{unknown[0]}", "step": step.name},
                )
            if missing := sorted(required - set(step.input)):
                raise ValidationFailed(
                    f"`{where}.input`: {step.endpoint} needs the field '{missing[0]}'.",
                    details={"field": f"{where}.input.{missing[0]}", "step": step.name},
                )
        for at, ref in references(step.input, f"{where}.input"):
            if ref.step is None:
                continue  # the pipeline's input is free: checked when it runs
            if ref.step not in position:
                raise ValidationFailed(
                    f"`{at}`: '{ref.text}' refers to an unknown step '{ref.step}'.",
                    details={"field": at, "step": step.name, "reference": ref.text},
                )
            if position[ref.step] >= i:
                which = "itself" if ref.step == step.name else f"the later step '{ref.step}'"
                raise ValidationFailed(
                    f"`{at}`: step '{step.name}' refers to {which}; a step may only use the "
                    "responses of the steps before it (so that steps never form a cycle).",
                    details={"field": at, "step": step.name, "reference": ref.text, "cycle": True},
                )
            earlier = p.steps[position[ref.step]]
            known = known_fields(JOB_ENDPOINTS[earlier.endpoint].endpoint)
            if ref.path and known is not None and ref.path[0] not in known:
                raise ValidationFailed(
                    f"`{at}`: '{ref.text}': the response of {earlier.endpoint} (step "
                    f"'{earlier.name}') has no field '{ref.path[0]}'; it has "
                    f"{', '.join(known)}.",
                    details={"field": at, "step": step.name, "reference": ref.text},
                )


# ---- running ---------------------------------------------------------------------------------
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


# ---- the store -------------------------------------------------------------------------------
# runtime_checkable: litestar checks each dependency's value against its annotation.
@runtime_checkable
class PipelineStore(Protocol):
    """Where pipelines are kept. Owner rules as for saved classifiers: a pipeline belongs to
    the key that saved it (None: an admin's, shared); a key sees its own and the shared
    ones, another key's are 404; only the owner or an admin may replace or delete one.
    `who=None` is the server itself. Calls block (files, a database): run them in a thread
    from the event loop when they write."""

    def list(self, who: Owner | None = None) -> list[Pipeline]: ...

    def get(self, name: str, who: Owner | None = None) -> Pipeline: ...

    def create(
        self, pipeline: Pipeline, *, replace: bool = False, who: Owner | None = None
    ) -> Pipeline: ...

    def delete(self, name: str, who: Owner | None = None) -> None: ...


def _admin(who: Owner | None) -> bool:
    return who is None or who.allows_scope("admin")


def visible(p: Pipeline, who: Owner | None) -> bool:
    return p.owner is None or _admin(who) or p.owner == who.id  # type: ignore[union-attr]


def not_found(name: str) -> NotFound:
    return NotFound(f"Pipeline '{name}' not found.", details={"pipeline": name})


class LocalPipelineStore:
    """One JSON file in data_dir, read once and kept in memory, written atomically (0600)."""

    def __init__(self, path: Path, *, max_per_key: int = 100) -> None:
        self.path = path
        self.max_per_key = max_per_key
        self._lock = threading.Lock()
        self._items: list[Pipeline] = self._read()

    def _read(self) -> list[Pipeline]:
        try:
            return msgspec.json.decode(self.path.read_bytes(), type=_File).pipelines
        except FileNotFoundError:
            return []

    def _write(self, items: list[Pipeline]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "wb") as fh:
            fh.write(msgspec.json.format(msgspec.json.encode(_File(items)), indent=2))
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)
        self._items = items

    def list(self, who: Owner | None = None) -> list[Pipeline]:
        with self._lock:
            return [p for p in self._items if visible(p, who)]

    def get(self, name: str, who: Owner | None = None) -> Pipeline:
        for p in self.list(who):
            if p.name == name:
                return p
        raise not_found(name)

    @staticmethod
    def _may_change(p: Pipeline, who: Owner | None) -> None:
        if not _admin(who) and p.owner != who.id:  # type: ignore[union-attr]
            raise Forbidden(
                f"Pipeline '{p.name}' is shared; only an admin key may change or delete it.",
                details={"pipeline": p.name},
            )

    def create(
        self, pipeline: Pipeline, *, replace: bool = False, who: Owner | None = None
    ) -> Pipeline:
        validate(pipeline)
        pipeline.created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        pipeline.owner = None if _admin(who) else who.id  # type: ignore[union-attr]
        with self._lock:
            items = self._items
            existing = next((p for p in items if p.name == pipeline.name), None)
            if existing is not None and not visible(existing, who):
                # Names are global: all another key may learn is that this one is taken.
                raise Conflict(
                    f"The name '{pipeline.name}' is taken; choose another.",
                    details={"pipeline": pipeline.name},
                )
            if existing is not None and not replace:
                raise Conflict(
                    f"Pipeline '{pipeline.name}' exists; delete it first or send replace=true.",
                    details={"pipeline": pipeline.name},
                )
            if existing is not None:
                self._may_change(existing, who)
                pipeline.owner = existing.owner
            elif pipeline.owner is not None:
                mine = sum(1 for p in items if p.owner == pipeline.owner)
                if mine >= self.max_per_key:
                    raise PipelineLimit(
                        f"This key has {mine} saved pipelines, the most allowed "
                        "(pipelines.max_per_key); delete one first.",
                        details={"limit": self.max_per_key},
                    )
            self._write([p for p in items if p.name != pipeline.name] + [pipeline])
        return pipeline

    def delete(self, name: str, who: Owner | None = None) -> None:
        with self._lock:
            found = next((p for p in self._items if p.name == name and visible(p, who)), None)
            if found is None:
                raise not_found(name)
            self._may_change(found, who)
            self._write([p for p in self._items if p.name != name])
