"""Request and response bodies, as msgspec structs: litestar validates them and documents them
in /openapi.json."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from appliance.errors import ValidationFailed

T = TypeVar("T")

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
NON_BLANK = r"[^\t\n\v\f\r \x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
"""Some character that is not whitespace to Python's str.strip(), spelled out because `\S`
means different sets in Python's re and in JSON Schema's (ECMA-262) regexes."""
Text = Annotated[str, msgspec.Meta(pattern=NON_BLANK)]
"""A text that is not blank."""
Texts = Annotated[list[str], msgspec.Meta(min_length=1)]
"""A batch of texts: one at least (the most per request is server.max_batch_items)."""
Fraction = Annotated[float, msgspec.Meta(ge=0, le=1)]

EXACTLY_ONE: dict[str, tuple[str, ...]] = {}
"""Body struct name -> fields of which a request must give exactly one (non-null). The
OpenAPI document states it as a oneOf (api/docs.py); handlers check it with check_one()."""


def exactly_one(*fields: str) -> Callable[[type[T]], type[T]]:
    def mark(cls: type[T]) -> type[T]:
        EXACTLY_ONE[cls.__name__] = fields
        return cls

    return mark


def check_one(body: Any) -> str:
    """The one field of EXACTLY_ONE[type(body)] that `body` gives; 422 naming them if not."""
    fields = EXACTLY_ONE[type(body).__name__]
    given = [f for f in fields if getattr(body, f) is not None]
    if len(given) != 1:
        names = " and ".join(f"`{f}`" for f in fields)
        raise ValidationFailed(f"Send exactly one of {names}.", details={"field": fields[0]})
    return given[0]


class PredictBody(msgspec.Struct, kw_only=True):
    input: Any
    """One input object; its fields depend on the model's task (e.g. {"text": "..."})."""
    truncate: bool = True
    """Cut inputs longer than the model's max tokens (the response says so); false: 422."""


class ModelRef(msgspec.Struct):
    code: str
    name: str


class PredictMeta(msgspec.Struct):
    status: int
    latency_ms: float
    tokens: int
    cached: bool
    truncated: bool


class PredictResponse(msgspec.Struct):
    request_id: str | None
    model: ModelRef
    output: dict[str, Any]
    meta: PredictMeta


class ModelSummary(msgspec.Struct, kw_only=True):
    code: str
    name: str
    slug: str
    task: str | None
    call_url: str
    is_active: bool
    build_status: str
    description: str
    tasks: list[str]
    # OpenAI's model object, so OpenAI-compatible clients listing /v1/models see each model.
    id: str = ""
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "appliance"


class ModelDetail(ModelSummary):
    example_payload: dict[str, Any]
    labels: list[str] | None
    dimension: int | None
    max_tokens: int | None
    quantization: dict[str, Any] | None
    size_bytes: int
    build_message: str
    validation: dict[str, Any] | None


class ModelList(msgspec.Struct):
    data: list[ModelSummary]
    object: Literal["list"] = "list"


class ModelDetailEnvelope(msgspec.Struct):
    data: ModelDetail
