"""Running one job: its input is read from the checkpoint in chunks of `jobs.chunk_lines`
lines; a chunk's lines run concurrently through the endpoint's own work function (so the
micro-batcher merges them into few model calls) at BACKGROUND priority (real-time requests go
first); their result lines are appended in input order and checkpointed with one fsync; then
the next chunk. A line that fails gets its error as its result; the job goes on.

Lines run as the job owner's key, looked up afresh for every chunk: a revoked or expired key
fails the job, a spent token quota (402) stops it after the chunk (start it again once the
quota allows: it resumes). Tokens count against the quota as for real-time requests and each
chunk is written to the usage log; jobs are not held to the key's per-minute rate limits,
which exist to share real-time capacity: a job only uses what real-time requests leave.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, BinaryIO, TypeVar

import msgspec
from litestar.serialization import encode_json

from appliance.api.tasks import Work
from appliance.classifiers import ClassifierStore
from appliance.config import Settings
from appliance.errors import (
    ApplianceError,
    InsufficientBalance,
    InvalidJSON,
    Overloaded,
    PayloadTooLarge,
    Unauthorized,
    ValidationFailed,
    error_body,
)
from appliance.gateway.keys import ApiKey, KeyStore
from appliance.gateway.ratelimit import LimitState, RateLimiter
from appliance.gateway.usage import Record, UsageLog
from appliance.inference import Call, Inference
from appliance.jobs.endpoints import JOB_ENDPOINTS, JobEndpoint
from appliance.jobs.store import InputLine, JobState, JobStore
from appliance.metrics import Metrics
from appliance.runtime.batcher import BACKGROUND

log = logging.getLogger("appliance.jobs")

T = TypeVar("T")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class UnmeteredLimiter(RateLimiter):
    """The rate limiter a job's lines see: never refuses, never takes (see the module doc).
    Its state is a constant: no response carries it, and buckets cost time on every line."""

    def admit_request(self, key_id: str, rpm: int, tpm: int) -> LimitState:
        return self.state(key_id, rpm, tpm)

    def admit_tokens(self, key_id: str, rpm: int, tpm: int, tokens: int) -> LimitState:
        return self.state(key_id, rpm, tpm)

    def settle_tokens(self, key_id: str, tpm: int, delta: int) -> None:
        return None

    def state(self, key_id: str, rpm: int, tpm: int) -> LimitState:
        return LimitState(rpm, rpm, tpm, tpm, 0)


@dataclass
class JobServices:
    """What running a job needs: the server's own runtime, cache, keys and usage log."""

    settings: Settings
    store: JobStore
    inference: Inference
    keys: KeyStore
    usage: UsageLog
    classifiers: ClassifierStore
    metrics: Metrics | None = None
    leases: Any = None
    """Cluster mode: appliance.cluster.leases.Leases; each chunk is committed only while
    this replica still holds the job's lease."""
    target: Callable[[str, ApiKey], JobEndpoint] = lambda path, _key: JOB_ENDPOINTS[path]
    """A job's endpoint for its owner's key (the manager's also finds saved pipelines)."""


@dataclass
class Job:
    """A job as the server holds it: its state (replaced, never mutated, at each checkpoint)
    and, while it runs, its task."""

    state: JobState
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    stopping: bool = False
    """Set on shutdown: finish and checkpoint the current chunk, then stop (still running)."""
    run_started: float = 0.0
    """time.monotonic() when this run began (for the ETA)."""
    run_done: int = 0
    """state.done when this run began."""


@dataclass(frozen=True, slots=True)
class LineOutcome:
    encoded: bytes
    """The result line, newline included."""
    status: int
    call: Call
    error: dict[str, Any] | None = None


class JobFailed(Exception):
    """The job cannot go on; `error` is the API error that says why."""

    def __init__(self, error: ApplianceError) -> None:
        super().__init__(error.message)
        self.error = error


async def settled(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a thread. If the caller is cancelled meanwhile, the call still finishes
    before the cancellation goes on: a job's files are never written after its task ends."""
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await future
        raise


def decode_line(raw: bytes, target: JobEndpoint, model: str | None, classifier: str | None) -> Any:
    """A line to the endpoint's body, with the run's default model and classifier; the
    real-time errors if not."""
    try:
        obj = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise InvalidJSON(f"The line is not valid JSON: {exc}") from None
    except RecursionError:  # what the real-time decoder says of such a body, too
        raise InvalidJSON("The line is not valid JSON: nested too deeply.") from None
    if isinstance(obj, dict):  # anything else: msgspec names the mismatch, as for litestar
        if model is not None:
            obj.setdefault("model", model)
        if classifier is not None and target.takes_classifier:
            obj.setdefault("classifier", classifier)
    try:
        return msgspec.convert(obj, target.endpoint.body, strict=False)
    except msgspec.ValidationError as exc:
        # The same message and details litestar gives a real-time request with this body.
        message, _, where = str(exc).partition(" - at `$")
        key = where.rstrip("`").lstrip(".") or "data"
        details: dict[str, Any] = {"errors": [{"message": message, "key": key, "source": "body"}]}
        if key != "data":
            details["field"] = key
            message = f"`{key}`: {message}"
        raise ValidationFailed(message, details=details) from None


def owner_key(keys: KeyStore, state: JobState) -> ApiKey:
    key = keys.get(state.key_id)
    if key is None or key.revoked or key.expired():
        raise JobFailed(
            Unauthorized(
                "The API key that created this job was revoked or has expired.",
                details={"key_id": state.key_id},
            )
        )
    return key


def find_target(services: JobServices, state: JobState, key: ApiKey) -> JobEndpoint:
    try:
        return services.target(state.endpoint, key)
    except ApplianceError as exc:
        raise JobFailed(exc) from None


async def _with_room(target: JobEndpoint, body: Any, work: Work) -> Any:
    """Run a line; while the model's queue is full (real-time traffic), wait and retry: a
    full queue is no answer to the line. (On shutdown the manager cancels a chunk that waits
    too long; it is redone after the restart.)"""
    delay = 0.05
    while True:
        try:
            answer, _ = await target.endpoint.run(body, work)
            return answer
        except Overloaded:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def answer_line(
    raw: bytes | None,
    target: JobEndpoint,
    work: Work,
    defaults: tuple[str | None, str | None] = (None, None),
) -> tuple[int, bytes]:
    """One input line (None: over the line limit), as its real-time endpoint would answer
    it: (200, the response's JSON) or (status, the error's JSON without its request id).
    Bytes, so that the answer can cross a process (Ray) and be framed the same way there."""
    try:
        if raw is None:
            limit = work.settings.server.max_body_bytes
            raise PayloadTooLarge(
                f"The line is longer than {limit} bytes (server.max_body_bytes).",
                details={"max_bytes": limit},
            )
        body = decode_line(raw, target, *defaults)
        return 200, encode_json(await _with_room(target, body, work))
    except ApplianceError as exc:
        error: ApplianceError = exc
    except Exception:  # a bug must not stop the run; the traceback goes to the log
        log.exception("batch line to %s failed", target.path)
        error = ApplianceError()
    fields = {"code": error.code, "message": error.message, "details": error.details}
    return error.status_code, encode_json(fields)


def result_line(
    number: int, status: int, payload: bytes, request_id: str
) -> tuple[bytes, dict[str, Any] | None]:
    """The result line (newline included) for an answer_line() outcome, and its error body."""
    if status == 200:
        line = {"line": number, "status": status, "response": msgspec.Raw(payload)}
        return encode_json(line) + b"\n", None
    fields = msgspec.json.decode(payload)
    error = error_body(
        fields["code"], fields["message"], details=fields["details"], request_id=request_id
    )
    return encode_json({"line": number, "status": status, "error": error}) + b"\n", error


async def run_line(
    line: InputLine, key: ApiKey, job: Job, target: JobEndpoint, services: JobServices
) -> LineOutcome:
    """One input line of a job, as its real-time endpoint would answer it."""
    settings = services.settings
    call = Call(key, read_cache=True, write_cache=settings.jobs.write_cache)
    work = Work(call, services.inference, settings, services.classifiers, BACKGROUND)
    defaults = (job.state.model, job.state.classifier)
    status, payload = await answer_line(line.raw, target, work, defaults)
    encoded, error = result_line(line.number, status, payload, f"{job.state.id}:{line.number}")
    return LineOutcome(encoded, status, call, error)


def record_usage(
    services: JobServices,
    state: JobState,
    outcomes: list[LineOutcome],
    first_line: int,
    seconds: float,
) -> None:
    """One usage record per model and status of a chunk (endpoint `JOB <path>`)."""
    groups: dict[tuple[str | None, int], list[Call]] = defaultdict(list)
    for o in outcomes:
        groups[(o.call.model, o.status)].append(o.call)
    now = time.time()
    for (model, status), calls in groups.items():
        tokens = sum(c.tokens for c in calls)
        services.usage.record(
            Record(
                ts=now,
                key_id=state.key_id,
                endpoint=f"JOB {state.endpoint}",
                model=model,
                status=status,
                latency_ms=seconds * 1000,
                tokens=tokens,
                cached=all(c.cache_status == "HIT" for c in calls),
                request_id=f"{state.id}:{first_line}",
            )
        )
        metrics = services.metrics
        if metrics is not None and model:
            if tokens:
                metrics.tokens.labels(model).inc(tokens)
            hits = sum(c.cache_status == "HIT" for c in calls)
            metrics.cache_hits.inc(hits)
            metrics.cache_misses.inc(sum(c.cache_status == "MISS" for c in calls))


async def finish(job: Job, store: JobStore, status: str, error: dict[str, Any] | None) -> None:
    state = msgspec.structs.replace(job.state, status=status, finished_at=utc_now(), error=error)
    await settled(store.save, state)
    job.state = state


@dataclass
class _Commit:
    """A chunk being made durable in a thread while the next chunk runs."""

    future: asyncio.Future[None]
    state: JobState
    outcomes: list[LineOutcome]
    first_line: int
    seconds: float


async def run_job(job: Job, services: JobServices) -> None:
    """Run `job` from its checkpoint until it completes or fails, or until `job.stopping` (the
    chunk in hand is finished and checkpointed first) or cancellation (nothing half-written).

    A chunk's fsyncs cost about as much as running it: they happen in a thread while the next
    chunk runs, and a chunk is only appended once the one before it is durable."""
    settings, store = services.settings, services.store
    reader, results = await settled(store.resume, job.state, settings.server.max_body_bytes)
    job.run_started, job.run_done = time.monotonic(), job.state.done
    commit: _Commit | None = None

    async def settle() -> None:
        """Wait for the chunk being committed; then it is the job's checkpoint."""
        nonlocal commit
        if commit is not None:
            await asyncio.shield(commit.future)
            done, commit = commit, None
            job.state = done.state
            record_usage(services, done.state, done.outcomes, done.first_line, done.seconds)

    try:
        while not job.stopping:
            try:
                key = owner_key(services.keys, job.state)
                # Afresh for every chunk, like the key: a pipeline deleted meanwhile fails
                # the job rather than each of its lines.
                target = find_target(services, job.state, key)
            except JobFailed as exc:
                await settle()
                await _fail(job, store, exc.error)
                return
            lines = await settled(reader.read, settings.jobs.chunk_lines)
            if not lines:
                await settle()
                await finish(job, store, "completed", None)
                log.info("job %s completed: %d lines", job.state.id, job.state.done)
                return
            started = time.perf_counter()
            outcomes = await asyncio.gather(
                *(run_line(line, key, job, target, services) for line in lines)
            )
            await settle()
            data = b"".join(o.encoded for o in outcomes)
            state = msgspec.structs.replace(
                job.state,
                done=job.state.done + len(outcomes),
                failed=job.state.failed + sum(o.status >= 400 for o in outcomes),
                tokens=job.state.tokens + sum(o.call.tokens for o in outcomes),
                input_offset=reader.offset,
                next_line=reader.next_line,
                results_bytes=job.state.results_bytes + len(data),
            )
            future = asyncio.ensure_future(
                asyncio.to_thread(_commit, services, results, data, state)
            )
            commit = _Commit(
                future, state, outcomes, lines[0].number, time.perf_counter() - started
            )
            quota = InsufficientBalance.status_code
            if (spent := next((o.error for o in outcomes if o.status == quota), None)) is not None:
                await settle()
                await finish(job, store, "failed", spent)
                log.warning("job %s stopped: the key's token quota is spent", job.state.id)
                return
        await settle()
    finally:
        if commit is not None:  # cancelled: the write finishes before the task ends
            await asyncio.wait({commit.future})
        reader.close()
        results.close()


def _commit(services: JobServices, results: BinaryIO, data: bytes, state: JobState) -> None:
    if services.leases is not None:
        services.leases.hold(state.id)  # LeaseLost: another replica has taken the job over
    services.store.commit(results, data, state)


async def _fail(job: Job, store: JobStore, error: ApplianceError) -> None:
    body = error_body(error.code, error.message, details=error.details, request_id=job.state.id)
    await finish(job, store, "failed", body)
    log.warning("job %s failed: %s", job.state.id, error.message)
