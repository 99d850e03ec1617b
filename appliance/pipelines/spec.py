"""A pipeline's definition, its `$.input` / `$.steps` references, and the checks made when
it is saved (see appliance.pipelines)."""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from typing import Any

import msgspec

from appliance.api.tasks import Endpoint
from appliance.classifiers import NAME
from appliance.errors import ValidationFailed
from appliance.jobs.endpoints import JOB_ENDPOINTS, JobEndpoint

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
