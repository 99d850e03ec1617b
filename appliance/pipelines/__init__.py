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

from appliance.pipelines.run import PipelineRun, StepResult, job_endpoint, run_pipeline, waves
from appliance.pipelines.spec import (
    JOB_PREFIX,
    MAX_STEPS,
    Pipeline,
    PipelineLimit,
    Reference,
    Step,
    parse_reference,
    references,
    validate,
)
from appliance.pipelines.store import LocalPipelineStore, PipelineStore

__all__ = [
    "JOB_PREFIX",
    "MAX_STEPS",
    "LocalPipelineStore",
    "Pipeline",
    "PipelineLimit",
    "PipelineRun",
    "PipelineStore",
    "Reference",
    "Step",
    "StepResult",
    "job_endpoint",
    "parse_reference",
    "references",
    "run_pipeline",
    "validate",
    "waves",
]
