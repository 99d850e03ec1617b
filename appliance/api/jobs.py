"""Async batch jobs (seeds/classify-api.txt, API.md "Async jobs"): upload an NDJSON file of
request bodies for one endpoint, start it, watch it, stream its results, delete it.

The upload is the raw request body, streamed to disk as it arrives: this route lifts the
real-time body limit and the job manager enforces `jobs.max_upload_bytes` itself.
"""

from __future__ import annotations

from typing import Any

from litestar import Request, delete, get, post
from litestar.params import Parameter
from litestar.response import Stream

from appliance.api.docs import raw_body
from appliance.gateway.auth import current_key
from appliance.jobs.manager import JobManager

NDJSON = "application/x-ndjson"


@post(
    "/v1/batch",
    opt={"scope": "jobs"},
    tags=["jobs"],
    status_code=201,
    request_max_body_size=None,  # the jobs cap is enforced while streaming, not by litestar
    operation_class=raw_body("application/x-ndjson", "One request body of `endpoint` per line."),
)
async def create_job(
    request: Request[Any, Any, Any],
    jobs: JobManager,
    endpoint: str = Parameter(
        description="The endpoint every line is a request body of, e.g. /v1/classify."
    ),
    model: str | None = Parameter(default=None, description="Default model for every line."),
    classifier: str | None = Parameter(
        default=None, description="Default saved classifier (classify and tag endpoints)."
    ),
) -> dict[str, Any]:
    """Create a job from the NDJSON request body (Content-Type: application/x-ndjson; one
    request body of `endpoint` per line; up to jobs.max_upload_bytes) → 201 with its `id`,
    `status: "created"` and `total` lines. Start it with POST /v1/batch/{id}/start."""
    job = await jobs.create(
        current_key(request),
        endpoint,
        request.stream(),
        model=model,
        classifier=classifier,
        content_type=request.headers.get("content-type", ""),
        content_length=request.content_length,
    )
    return jobs.view(job)


@post("/v1/batch/{job_id:str}/start", opt={"scope": "jobs"}, tags=["jobs"], status_code=200)
async def start_job(
    job_id: str, request: Request[Any, Any, Any], jobs: JobManager
) -> dict[str, Any]:
    """Start a created job (or resume a failed one); 409 when jobs.max_running jobs run."""
    return jobs.view(await jobs.start_job(job_id, current_key(request)))


@get("/v1/batch", opt={"scope": "jobs"}, tags=["jobs"])
async def list_jobs(request: Request[Any, Any, Any], jobs: JobManager) -> dict[str, Any]:
    """The calling key's jobs, newest first (an admin key: every job)."""
    return {"data": [jobs.view(job) for job in jobs.list(current_key(request))]}


@get("/v1/batch/{job_id:str}", opt={"scope": "jobs"}, tags=["jobs"])
async def get_job(job_id: str, request: Request[Any, Any, Any], jobs: JobManager) -> dict[str, Any]:
    """Status (created, running, completed, failed, cancelled), counts, progress, times, ETA."""
    return jobs.view(jobs.get(job_id, current_key(request)))


@get("/v1/batch/{job_id:str}/results", opt={"scope": "jobs"}, tags=["jobs"], media_type=NDJSON)
async def job_results(job_id: str, request: Request[Any, Any, Any], jobs: JobManager) -> Stream:
    """NDJSON, one line per input line in input order: {"line": n, "status": 200, "response":
    {...}} or {"line": n, "status": 4xx, "error": {...}}. While the job runs: the lines done."""
    return Stream(jobs.results(job_id, current_key(request)), media_type=NDJSON)


@delete("/v1/batch/{job_id:str}", opt={"scope": "jobs"}, tags=["jobs"], status_code=200)
async def delete_job(
    job_id: str, request: Request[Any, Any, Any], jobs: JobManager
) -> dict[str, Any]:
    """Cancel the job if it runs and delete its files."""
    return await jobs.delete(job_id, current_key(request))


ROUTES = [create_job, start_job, list_jobs, get_job, job_results, delete_job]
