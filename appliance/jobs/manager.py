"""The server's jobs: created from a streamed upload, started (at most `jobs.max_running` at
once), watched, read back and deleted; running jobs resume when the server starts and are
checkpointed when it stops. A key sees its own jobs; an admin key sees every job."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

import msgspec

from appliance.classifiers import ClassifierStore
from appliance.cluster.leases import LeaseLost
from appliance.config import Settings
from appliance.errors import (
    ApplianceError,
    BadRequest,
    Conflict,
    Forbidden,
    InsufficientStorage,
    JobStorageExceeded,
    NotFound,
    PayloadTooLarge,
    TooManyJobs,
    ValidationFailed,
    error_body,
)
from appliance.gateway.keys import ApiKey, KeyStore
from appliance.gateway.usage import UsageLog
from appliance.inference import Inference
from appliance.jobs.endpoints import JOB_ENDPOINTS, JobEndpoint
from appliance.jobs.store import JobState, JobStore
from appliance.jobs.worker import Job, JobServices, UnmeteredLimiter, run_job, settled, utc_now
from appliance.metrics import Metrics
from appliance.pipelines import JOB_PREFIX, PipelineStore, job_endpoint

log = logging.getLogger("appliance.jobs")

WRITE_BLOCK = 1 << 20  # the upload reaches the disk in blocks of about this many bytes
# Bodies that are not raw NDJSON (a form upload would store its envelope as lines).
REFUSED_CONTENT_TYPES = ("multipart/", "application/x-www-form-urlencoded")
FINISHED = ("completed", "failed", "cancelled")
SWEEP_EVERY_SECONDS = 3600.0  # retention is counted in days: an hourly sweep is precise enough
TAKEOVER_SECONDS = 3.0  # cluster mode: how often a replica looks for jobs whose replica died
UPLOAD_GRACE_SECONDS = 6 * 3600.0  # a shared folder's upload younger than this is in progress


class JobManager:
    def __init__(
        self,
        settings: Settings,
        inference: Inference,
        keys: KeyStore,
        usage: UsageLog,
        classifiers: ClassifierStore,
        metrics: Metrics | None = None,
        leases: Any = None,
        pipelines: PipelineStore | None = None,
    ) -> None:
        self.settings = settings
        self.pipelines = pipelines
        # Cluster mode: the jobs folder is shared by every replica, and a job runs where its
        # lease (PostgreSQL) is held; the others see it through the folder.
        self.leases = leases
        self.store = JobStore(settings.data_path / settings.jobs.dir)
        # The same registry, cache and usage log as real-time requests; only the rate limiter
        # differs (jobs are paced by priority, see appliance.jobs.worker).
        self.services = JobServices(
            settings=settings,
            store=self.store,
            inference=replace(inference, limiter=UnmeteredLimiter()),
            keys=keys,
            usage=usage,
            classifiers=classifiers,
            metrics=metrics,
            leases=leases,
            target=self.target,
        )
        self.jobs: dict[str, Job] = {}
        self._starting = asyncio.Lock()
        # Injectable for tests: the retention clock and the free space of the jobs' disk.
        self.clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)
        self.free_bytes: Callable[[], int] = self._disk_free
        self._sweeper: asyncio.Task[None] | None = None
        self._taker: asyncio.Task[None] | None = None

    def _disk_free(self) -> int:
        folder = self.store.root
        while not folder.exists() and folder != folder.parent:  # before the first job
            folder = folder.parent
        return shutil.disk_usage(folder).free

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the jobs on disk and resume the ones that were running."""
        # Shared folder: another replica's upload in progress is not debris.
        keep = UPLOAD_GRACE_SECONDS if self.leases is not None else 0.0
        states = await asyncio.to_thread(self.store.load_all, keep)
        self.jobs = {s.id: Job(s) for s in states}
        if self.leases is None:
            for job in self.jobs.values():
                if job.state.status == "running":
                    log.info("job %s resumes at line %d", job.state.id, job.state.next_line)
                    self._launch(job)
        await self.sweep()
        loop = asyncio.get_running_loop()
        self._sweeper = loop.create_task(self._sweep_forever())
        if self.leases is not None:
            await self.take_over()
            self._taker = loop.create_task(self._take_over_forever())

    # ---- cluster mode: jobs whose replica died -----------------------------------------------
    async def _refresh(self) -> None:
        if self.leases is not None:
            await asyncio.to_thread(self._refresh_now)

    def _refresh_one(self, job_id: str) -> None:
        """As _refresh_now for one job: a status poll reads one state file, not every job's."""
        if self.leases is None:
            return
        job = self.jobs.get(job_id)
        if job is not None and job.task is not None:
            return  # run here: the state in memory is the newest
        state = self.store.load(job_id)
        if state is None:
            self.jobs.pop(job_id, None)
        elif job is None:
            self.jobs[job_id] = Job(state)
        else:
            job.state = state

    def _refresh_now(self) -> None:
        """Re-read the shared folder: jobs created, progressed or deleted by other replicas.
        Jobs this replica runs keep their state in memory (it is the newest)."""
        if self.leases is None:
            return
        states = self.store.load_all(UPLOAD_GRACE_SECONDS, clean=False)
        fresh = {s.id: s for s in states}
        for job_id in list(self.jobs):
            if job_id not in fresh and self.jobs[job_id].task is None:
                del self.jobs[job_id]
        for job_id, state in fresh.items():
            job = self.jobs.get(job_id)
            if job is None:
                self.jobs[job_id] = Job(state)
            elif job.task is None:
                job.state = state

    async def take_over(self) -> list[str]:
        """Run the jobs marked running whose lease nobody holds (their replica died or
        stopped): each resumes from its checkpoint. Returns their ids."""
        await self._refresh()
        taken = []
        for job in list(self.jobs.values()):
            if job.state.status != "running" or job.task is not None:
                continue
            try:
                won = await asyncio.to_thread(self.leases.acquire, job.state.id)
            except ApplianceError:
                return taken  # PostgreSQL down: try again at the next round
            if not won:
                continue
            state = await asyncio.to_thread(self.store.load, job.state.id)
            if state is None or state.status != "running":
                await asyncio.to_thread(self.leases.release, job.state.id)
                continue
            job.state = state
            log.warning("job %s taken over at line %d", state.id, state.next_line)
            self._launch(job)
            taken.append(state.id)
        return taken

    async def _take_over_forever(self) -> None:
        while True:
            await asyncio.sleep(TAKEOVER_SECONDS)
            try:
                await self.take_over()
            except Exception:
                log.exception("job takeover round failed")

    async def _heartbeat(self, job: Job) -> None:
        from appliance.cluster.leases import RENEW_SECONDS

        while True:
            await asyncio.sleep(RENEW_SECONDS)
            try:
                held = await asyncio.to_thread(self.leases.renew, job.state.id)
            except ApplianceError:
                continue  # PostgreSQL down: the chunk commit checks again
            if not held:
                log.warning("job %s: lease lost, stopping here", job.state.id)
                job.stopping = True
                return

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY_SECONDS)
            try:
                await self.sweep()
            except OSError:  # a full or read-only disk: try again at the next sweep
                log.exception("jobs retention sweep failed")

    async def sweep(self) -> list[str]:
        """Remove finished jobs older than jobs.retention_days, files and all; their ids."""
        cutoff = self.clock() - timedelta(days=self.settings.jobs.retention_days)
        old = [
            job_id
            for job_id, job in self.jobs.items()
            if job.state.status in FINISHED
            and job.task is None
            and datetime.fromisoformat(job.state.finished_at or job.state.created_at) < cutoff
        ]
        for job_id in old:
            self.jobs.pop(job_id, None)
            await asyncio.to_thread(self.store.delete, job_id)
            log.info("job %s removed: finished before %s", job_id, cutoff.isoformat())
        return old

    async def stop(self) -> None:
        """Let running jobs checkpoint their current chunk (bounded by
        jobs.stop_timeout_seconds), then stop them; they resume at the next start."""
        for task in (self._sweeper, self._taker):
            if task is not None:
                task.cancel()
        self._sweeper = self._taker = None
        tasks = [job.task for job in self.jobs.values() if job.task is not None]
        for job in self.jobs.values():
            job.stopping = True
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=self.settings.jobs.stop_timeout_seconds)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)

    def _launch(self, job: Job) -> None:
        job.stopping = False
        job.task = asyncio.get_running_loop().create_task(
            self._run(job), name=f"job-{job.state.id}"
        )

    async def _run(self, job: Job) -> None:
        beat = None
        if self.leases is not None:
            beat = asyncio.get_running_loop().create_task(self._heartbeat(job))
        try:
            await run_job(job, self.services)
        except asyncio.CancelledError:
            raise
        except LeaseLost:
            log.warning("job %s: another replica holds it now", job.state.id)
        except Exception:  # a bug or a disk error: fail the job, keep the server
            log.exception("job %s failed", job.state.id)
            error = ApplianceError("The job stopped on an internal error; start it to resume.")
            state = msgspec.structs.replace(
                job.state,
                status="failed",
                finished_at=utc_now(),
                error=error_body(error.code, error.message, details={}, request_id=job.state.id),
            )
            try:
                await settled(self.store.save, state)
            except OSError:
                log.exception("job %s: state not saved", job.state.id)
            job.state = state
        finally:
            job.task = None
            if beat is not None:
                beat.cancel()
                # Finished or stopping: let go, so that another replica can resume a job that
                # is still running at once instead of after the lease expires.
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.leases.release, job.state.id)

    # ---- operations ------------------------------------------------------------------------
    def target(self, path: str, key: ApiKey | None = None) -> JobEndpoint:
        """The endpoint a job's lines run: a fixed one, or `/pipelines/NAME` (a saved
        pipeline `key` may see, as it is now: 404 otherwise)."""
        if path.startswith(JOB_PREFIX) and self.pipelines is not None:
            return job_endpoint(self.pipelines.get(path.removeprefix(JOB_PREFIX), key))
        target = JOB_ENDPOINTS.get(path)
        if target is None:
            raise ValidationFailed(
                f"A job cannot run endpoint '{path}'; it may run {', '.join(JOB_ENDPOINTS)} "
                f"or {JOB_PREFIX}NAME (a saved pipeline).",
                details={"field": "endpoint", "allowed": list(JOB_ENDPOINTS)},
            )
        return target

    async def _check_defaults(
        self, key: ApiKey, target: JobEndpoint, model: str | None, classifier: str | None
    ) -> None:
        """Refuse at once what would fail every line: an unknown or forbidden model, a saved
        classifier that does not exist or that the endpoint does not take."""
        if model is not None:
            entry = self.services.inference.registry.resolve(model, target.alias_scope)
            if not key.allows_model(entry.slug):
                raise Forbidden(
                    f"This API key may not use model '{entry.slug}'.",
                    details={"model": entry.slug},
                )
        if classifier is not None:
            if not target.takes_classifier:
                raise ValidationFailed(
                    f"Endpoint '{target.path}' takes no classifier.",
                    details={"field": "classifier"},
                )
            self.services.classifiers.get(classifier, key)  # another key's: 404

    async def create(
        self,
        key: ApiKey,
        path: str,
        body: AsyncIterator[bytes],
        *,
        model: str | None = None,
        classifier: str | None = None,
        content_type: str = "",
        content_length: int | None = None,
    ) -> Job:
        """Write the streamed NDJSON `body` to a new job's folder; the job is `created`."""
        target = self.target(path, key)
        await self._check_defaults(key, target, model, classifier)
        if content_type.lower().startswith(REFUSED_CONTENT_TYPES):
            raise BadRequest(
                "Send the NDJSON as the raw request body (Content-Type: application/x-ndjson), "
                "not as a form.",
                details={"content_type": content_type},
            )
        cap = self.settings.jobs.max_upload_bytes
        if content_length is not None and content_length > cap:
            raise self._too_large(cap)
        cap = min(cap, self._check_key_limits(key))
        if content_length is not None and content_length > cap:
            raise self._over_budget(key, content_length)
        self._check_disk(content_length or 0)
        job_id = "batch_" + secrets.token_hex(8)
        upload = await asyncio.to_thread(self.store.begin_upload, job_id)
        try:
            pending = bytearray()
            size = 0
            async for piece in body:
                size += len(piece)
                if size > cap:
                    if cap < self.settings.jobs.max_upload_bytes:
                        raise self._over_budget(key, size)
                    raise self._too_large(cap)
                pending += piece
                if len(pending) >= WRITE_BLOCK:
                    # A disk filling up under the upload stops it before the disk is full.
                    await asyncio.to_thread(self._check_disk, len(pending))
                    await asyncio.to_thread(upload.write, pending)
                    pending.clear()
            if pending:
                await asyncio.to_thread(self._check_disk, len(pending))
                await asyncio.to_thread(upload.write, pending)
            total = upload.counter.finish()
            if total == 0:
                raise ValidationFailed(
                    "The body holds no lines: send one request body of the endpoint per line.",
                    details={"field": "body"},
                )
            state = JobState(
                id=job_id,
                key_id=key.id,
                endpoint=path,
                model=model,
                classifier=classifier,
                created_at=utc_now(),
                total=total,
                input_bytes=size,
            )
            await asyncio.to_thread(upload.finish, state)
        except BaseException:
            upload.abort()  # in this thread: it must happen even when the request is cancelled
            raise
        job = self.jobs[job_id] = Job(state)
        log.info("job %s created: %d lines for %s", job_id, total, path)
        return job

    def _check_key_limits(self, key: ApiKey) -> int:
        """429 when `key` keeps jobs.max_jobs_per_key jobs; else the bytes it may still upload."""
        mine = [j for j in self.jobs.values() if j.state.key_id == key.id]
        limit = self.settings.jobs.max_jobs_per_key
        if len(mine) >= limit:
            raise TooManyJobs(
                f"This key keeps {len(mine)} batch jobs, the most allowed "
                "(jobs.max_jobs_per_key); delete finished ones first.",
                details={"jobs": len(mine), "max_jobs_per_key": limit},
            )
        used = sum(j.state.input_bytes for j in mine)
        left = self.settings.jobs.max_bytes_per_key - used
        if left <= 0:
            raise self._over_budget(key, 0)
        return left

    def _over_budget(self, key: ApiKey, size: int) -> JobStorageExceeded:
        budget = self.settings.jobs.max_bytes_per_key
        used = sum(j.state.input_bytes for j in self.jobs.values() if j.state.key_id == key.id)
        return JobStorageExceeded(
            f"This key's batch jobs hold {used} bytes; with this upload they would pass "
            f"{budget} bytes (jobs.max_bytes_per_key). Delete finished jobs first.",
            details={"used_bytes": used, "upload_bytes": size, "max_bytes_per_key": budget},
        )

    def _check_disk(self, incoming: int) -> None:
        """507 when writing `incoming` more bytes would leave less than jobs.min_free_bytes."""
        free, reserve = self.free_bytes(), self.settings.jobs.min_free_bytes
        if free - incoming < reserve:
            raise InsufficientStorage(
                "The server's disk is nearly full; the upload was refused.",
                details={"free_bytes": free, "min_free_bytes": reserve},
            )

    @staticmethod
    def _too_large(cap: int) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"The upload is larger than {cap} bytes (jobs.max_upload_bytes).",
            details={"max_bytes": cap},
        )

    def get(self, job_id: str, key: ApiKey) -> Job:
        """The job, if `key` may see it: its own, or any for an admin key; else 404."""
        self._refresh_one(job_id)  # cluster mode: this job's state as the folder has it
        job = self.jobs.get(job_id)
        if job is None or (job.state.key_id != key.id and not key.allows_scope("admin")):
            raise NotFound(f"No batch job '{job_id}'.", details={"id": job_id})
        return job

    def list(self, key: ApiKey) -> list[Job]:
        """The jobs `key` may see, newest first."""
        admin = key.allows_scope("admin")
        self._refresh_now()
        jobs = [j for j in self.jobs.values() if admin or j.state.key_id == key.id]
        return sorted(jobs, key=lambda j: (j.state.created_at, j.state.id), reverse=True)

    async def start_job(self, job_id: str, key: ApiKey) -> Job:
        """Run a created job, or resume a failed one from its checkpoint. 409 if it runs or
        is complete, or if `jobs.max_running` jobs run already."""
        await self._refresh()
        job = self.get(job_id, key)
        async with self._starting:
            status = job.state.status
            if status not in ("created", "failed"):
                raise Conflict(
                    f"Batch job '{job_id}' is {status}; only a created or failed job can start.",
                    details={"id": job_id, "status": status},
                )
            running = sum(j.state.status == "running" for j in self.jobs.values())
            limit = self.settings.jobs.max_running
            if running >= limit:
                raise Conflict(
                    f"{running} batch jobs are running, the most allowed at once; start this "
                    "one when another finishes.",
                    details={"running": running, "max_running": limit},
                )
            if self.leases is not None and not await asyncio.to_thread(self.leases.acquire, job_id):
                raise Conflict(
                    f"Batch job '{job_id}' is being started by another replica.",
                    details={"id": job_id},
                )
            state = msgspec.structs.replace(
                job.state,
                status="running",
                started_at=job.state.started_at or utc_now(),
                finished_at=None,
                error=None,
            )
            await settled(self.store.save, state)
            job.state = state
            self._launch(job)
        log.info("job %s started", job_id)
        return job

    async def delete(self, job_id: str, key: ApiKey) -> dict[str, Any]:
        """Cancel the job if it runs, and remove its files. Returns its last view."""
        job = self.get(job_id, key)
        if (task := job.task) is not None:
            task.cancel()
            await asyncio.wait({task})
        if job.state.status in ("created", "running"):
            job.state = msgspec.structs.replace(
                job.state, status="cancelled", finished_at=utc_now()
            )
        self.jobs.pop(job_id, None)
        await asyncio.to_thread(self.store.delete, job_id)
        log.info("job %s deleted", job_id)
        return {**self.view(job), "deleted": True}

    def results(self, job_id: str, key: ApiKey) -> AsyncIterator[bytes]:
        """The result lines committed so far, to stream from disk (404 now, not mid-stream)."""
        job = self.get(job_id, key)
        return self._read_results(job_id, job.state.results_bytes)

    async def _read_results(self, job_id: str, limit: int) -> AsyncIterator[bytes]:
        blocks = self.store.read_results(job_id, limit)
        try:
            while (block := await asyncio.to_thread(next, blocks, None)) is not None:
                yield block
        finally:
            await asyncio.to_thread(blocks.close)

    def view(self, job: Job) -> dict[str, Any]:
        """What the API shows of a job."""
        s = job.state
        eta = None
        if s.status == "running" and job.run_started:
            processed, elapsed = s.done - job.run_done, time.monotonic() - job.run_started
            if processed > 0 and elapsed > 0:
                eta = round((s.total - s.done) * elapsed / processed, 1)
        return {
            "id": s.id,
            "object": "batch",
            "endpoint": s.endpoint,
            "model": s.model,
            "classifier": s.classifier,
            "status": s.status,
            "total": s.total,
            "done": s.done,
            "succeeded": s.done - s.failed,
            "failed": s.failed,
            "progress": round(s.done / s.total, 4) if s.total else 1.0,
            "eta_seconds": eta,
            "tokens": s.tokens,
            "input_bytes": s.input_bytes,
            "created_at": s.created_at,
            "started_at": s.started_at,
            "finished_at": s.finished_at,
            "key_id": s.key_id,
            "error": s.error,
        }
