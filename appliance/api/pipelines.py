"""Saved pipelines (issue #18): create, list, read and delete them, and run one with its input
(POST, or GET with the input as query parameters, as the endpoint API's GET form)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.params import Parameter

from appliance.api.tasks import work_of
from appliance.classifiers import NAME
from appliance.gateway.auth import current_key
from appliance.pipelines import (
    MAX_STEPS,
    Pipeline,
    PipelineRun,
    PipelineStore,
    Step,
    run_pipeline,
)

Name = Annotated[str, msgspec.Meta(pattern=NAME.pattern, max_length=64)]


class StepBody(msgspec.Struct, kw_only=True):
    name: Name
    """Unique within the pipeline; later steps use its response as `$.steps.NAME`."""
    endpoint: str
    """An endpoint a batch job may run, e.g. /v1/summarisation or /v1/classify."""
    input: dict[str, Any] = msgspec.field(default_factory=dict)
    """That endpoint's body; strings "$.input.FIELD" or "$.steps.STEP.FIELD.sub.0" refer to
    the pipeline's input or to an earlier step's response."""


class PipelineBody(msgspec.Struct, kw_only=True):
    name: Name
    steps: Annotated[list[StepBody], msgspec.Meta(min_length=1, max_length=MAX_STEPS)]
    description: str = ""
    replace: bool = False
    """Overwrite a pipeline of this name (yours, or any for an admin key)."""


class PipelineView(msgspec.Struct, kw_only=True):
    name: str
    description: str
    steps: list[StepBody]
    created_at: str
    owner: str | None
    """The key id that saved it; null: shared (saved by an admin key)."""


class PipelineList(msgspec.Struct):
    data: list[PipelineView]


class PipelineRunResponse(msgspec.Struct, kw_only=True):
    output: Any
    """The last step's response."""
    steps: dict[str, Any]
    """Every step's response, by step name."""
    tokens: int
    """Tokens charged, over every step (0 for the steps answered from the cache)."""
    latency_ms: float


def view(p: Pipeline) -> PipelineView:
    return PipelineView(
        name=p.name,
        description=p.description,
        steps=[StepBody(name=s.name, endpoint=s.endpoint, input=s.input) for s in p.steps],
        created_at=p.created_at,
        owner=p.owner,
    )


def run_response(run: PipelineRun) -> Response[PipelineRunResponse]:
    """The run's body with the headers of an inference response, over its steps: the tokens
    of all, the cache status of all (HIT only if every step was a hit), the last step's
    model, and the rate-limit state after the last step."""
    headers = {"X-Cache": run.cache_status, "X-Tokens-Used": str(run.tokens)}
    outcomes = [r.outcome for r in run.results if r.outcome is not None]
    if outcomes:
        headers["X-Model"] = outcomes[-1].model.slug
        headers.update(outcomes[-1].limits.headers())
        if any(o.truncated for o in outcomes):
            headers["X-Truncated"] = "true"
    return Response(PipelineRunResponse(**run.body()), headers=headers)


@post("/v1/pipelines", opt={"scope": "predict"}, tags=["pipelines"], status_code=201)
async def create_pipeline(
    request: Request[Any, Any, Any], data: PipelineBody, pipelines: PipelineStore
) -> PipelineView:
    """Save a pipeline: steps run in order, each the body of an endpoint, whose string values
    may be "$.input.FIELD" or "$.steps.STEP.FIELD". 422 names an unknown endpoint, field or
    step, or a reference to a later step (a cycle); 409 if the name exists (unless replace)."""
    pipeline = Pipeline(
        name=data.name,
        description=data.description,
        steps=[Step(name=s.name, endpoint=s.endpoint, input=s.input) for s in data.steps],
    )
    saved = await asyncio.to_thread(
        pipelines.create, pipeline, replace=data.replace, who=current_key(request)
    )
    return view(saved)


@get("/v1/pipelines", opt={"scope": "predict"}, tags=["pipelines"])
async def list_pipelines(request: Request[Any, Any, Any], pipelines: PipelineStore) -> PipelineList:
    """Saved pipelines this key may run: its own and the shared ones (an admin key: all)."""
    return PipelineList(data=[view(p) for p in pipelines.list(current_key(request))])


@get("/v1/pipelines/{name:str}", opt={"scope": "predict"}, tags=["pipelines"])
async def get_pipeline(
    request: Request[Any, Any, Any], name: str, pipelines: PipelineStore
) -> PipelineView:
    """One saved pipeline (404 if it is another key's)."""
    return view(pipelines.get(name, current_key(request)))


@delete("/v1/pipelines/{name:str}", opt={"scope": "predict"}, tags=["pipelines"], status_code=200)
async def delete_pipeline(
    request: Request[Any, Any, Any], name: str, pipelines: PipelineStore
) -> dict[str, Any]:
    """Delete a saved pipeline: the owner's or, for shared ones, an admin's."""
    await asyncio.to_thread(pipelines.delete, name, current_key(request))
    return {"name": name, "deleted": True}


@post(
    ["/pipelines/{name:str}", "/v1/pipelines/{name:str}/run"],
    opt={"scope": "predict"},
    tags=["pipelines"],
    status_code=200,
)
async def run(
    name: str, data: dict[str, Any], pipelines: PipelineStore, request: Request[Any, Any, Any]
) -> Response[PipelineRunResponse]:
    """Run a pipeline with the body as its input ($.input): {output (the last step's
    response), steps: {STEP: response}, tokens, latency_ms}. A failing step answers with its
    own error, status and all, plus `details.step`."""
    work = work_of(request)
    pipeline = pipelines.get(name, work.call.key)
    return run_response(await run_pipeline(pipeline, data, work))


def query_input(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """The query parameters as an input object: a repeated parameter becomes a list."""
    return {
        k: values[0] if len(values) == 1 else values
        for k, values in request.query_params.dict().items()
    }


@get("/pipelines/{name:str}", opt={"scope": "predict"}, tags=["pipelines"])
async def run_from_query(
    request: Request[Any, Any, Any],
    name: str,
    pipelines: PipelineStore,
    text: str | None = Parameter(
        default=None,
        description="An input field; every query parameter is one (`?text=...&labels=a`).",
    ),
) -> Response[PipelineRunResponse | PipelineView]:
    """With query parameters: run the pipeline with them as its input (as POST
    /pipelines/{name} with that object as the body). Without any: the pipeline's details."""
    work = work_of(request)
    pipeline = pipelines.get(name, work.call.key)
    given = query_input(request)
    if not given:
        return Response(view(pipeline))
    return run_response(await run_pipeline(pipeline, given, work))  # type: ignore[return-value]


ROUTES = [create_pipeline, list_pipelines, get_pipeline, delete_pipeline, run, run_from_query]
