"""Models uploaded while serving: a zip of an exported model folder (verified against its
manifest and installed) or of a Hugging Face checkpoint (exported and quantised in the
background by the exporter, in a separate, lower-priority process, so a failing or slow
export can neither crash nor slow the server). Progress shows as the model's build_status.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.config import Settings
from appliance.errors import ExportUnavailable, NotFound, PayloadTooLarge, ValidationFailed
from appliance.models.archive import discard, unpack
from appliance.models.manifest import (
    MANIFEST_FILE,
    ManifestError,
    install_folder,
    read_manifest,
    verify,
    write_manifest,
)
from appliance.models.registry import Registry
from appliance.tasks import RUNNERS

log = logging.getLogger("appliance.builds")

SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{2,99}$")
UPLOAD_URL_TTL = 3600
EXPORT_NICENESS = 10  # serving keeps the CPU first
# What `appliance export` imports (the `export` extra); a serving-only install lacks it.
EXPORT_STACK = ("torch", "transformers", "optimum", "onnx")


def _has(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def export_installed() -> bool:
    return all(_has(name) for name in EXPORT_STACK)


def _kill_group(pid: int) -> None:
    """SIGKILL the exporter and every process it started (its own session and group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


# Architectures' suffixes -> the export task, for uploads that do not say their task.
_ARCHITECTURES = (
    ("ForSequenceClassification", "text-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForCausalLM", "text-generation"),
    ("ForConditionalGeneration", "summarisation"),
    ("ForImageClassification", "image-classification"),
    ("CLIPModel", "zero-shot-image-classification"),
    ("Model", "feature-extraction"),
)


def guess_task(config: dict[str, object]) -> str | None:
    for arch in config.get("architectures") or []:  # type: ignore[union-attr]
        for suffix, task in _ARCHITECTURES:
            if str(arch).endswith(suffix):
                return task
    return None


class BuildFailed(Exception):
    """An uploaded model could not be built; the message says why."""


@dataclass(frozen=True)
class UploadGrant:
    slug: str
    task: str | None
    expires: float


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


class Builds:
    def __init__(
        self, settings: Settings, registry: Registry, leases: Any = None, grants: Any = None
    ) -> None:
        self.leases = leases  # cluster mode: one replica builds an upload (a PostgreSQL lease)
        self.shared_grants = grants  # cluster mode: upload URLs any replica redeems
        self.settings = settings
        self.registry = registry
        self.uploads = settings.data_path / "uploads"
        self._grants: dict[str, UploadGrant] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}  # slug -> its queued or running build
        self.procs: dict[str, asyncio.subprocess.Process] = {}  # slug -> its running exporter
        # Exports are CPU- and memory-heavy: one at a time, the others wait their turn.
        self._turn = asyncio.Lock()
        self.export_available: Callable[[], bool] = export_installed  # injectable for tests
        # Zips and staging folders a previous run left behind (a crash, a kill) are garbage.
        # With server.workers > 1 the folder is shared, and what another worker is receiving
        # or building now is not: only what nobody touched for a whole build timeout goes.
        shared = settings.server.workers > 1
        oldest = time.time() - settings.models.build_timeout_seconds
        for stale in self.uploads.glob("*") if self.uploads.is_dir() else ():
            if shared and _mtime(stale) > oldest:
                continue
            if stale.is_dir():
                discard(stale)
            else:
                stale.unlink(missing_ok=True)

    # ---- upload URLs (task-API compatibility) --------------------------------------------
    def grant(self, slug: str, task: str | None) -> str:
        self._check_slug(slug)
        now = time.time()
        token = secrets.token_urlsafe(24)
        if self.shared_grants is not None:  # cluster mode: redeemable on any replica
            self.shared_grants.put(token, slug, task, now + UPLOAD_URL_TTL)
            return token
        self._grants = {t: g for t, g in self._grants.items() if g.expires > now}
        self._grants[token] = UploadGrant(slug, task, now + UPLOAD_URL_TTL)
        return token

    def redeem(self, token: str) -> UploadGrant:
        if self.shared_grants is not None:
            row = self.shared_grants.take(token)
            grant = UploadGrant(*row) if row is not None else None
        else:
            grant = self._grants.pop(token, None)
        if grant is None or grant.expires < time.time():
            raise NotFound("This upload URL is unknown, used or expired.")
        return grant

    # ---- receiving -----------------------------------------------------------------------
    @staticmethod
    def _check_slug(slug: str) -> None:
        if not SLUG.match(slug):
            raise ValidationFailed(
                "`name` must be 3-100 lowercase letters, digits, '-' or '_'.",
                details={"field": "name"},
            )

    async def receive(self, body: AsyncIterator[bytes], slug: str, task: str | None) -> str:
        """Store the zip (streamed, capped), check it, and build it in the background.
        Returns the build status ("building"); bad uploads raise a 4xx at once."""
        self._check_slug(slug)
        if task is not None and task not in RUNNERS:
            raise ValidationFailed(
                f"Unknown task '{task}'; tasks: {', '.join(RUNNERS)}.", details={"field": "task"}
            )
        zip_path = await self._store(body)
        staging = self.uploads / zip_path.stem
        try:
            root = await asyncio.to_thread(
                unpack,
                zip_path,
                staging,
                max_unpacked_bytes=self.settings.models.max_unpacked_bytes,
                max_ratio=self.settings.models.max_compression_ratio,
            )
            exported = (root / MANIFEST_FILE).is_file()
            if exported:
                await asyncio.to_thread(self._check_exported, root)
            else:
                task = task or await asyncio.to_thread(self._checkpoint_task, root)
                if not self.export_available():
                    raise ExportUnavailable(
                        "This install cannot export checkpoints (the `export` extra is not "
                        "installed); upload an exported model zip, or install "
                        "appliance[export].",
                        details={"missing": [n for n in EXPORT_STACK if not _has(n)]},
                    )
        except BaseException:
            discard(staging)
            raise
        finally:
            zip_path.unlink(missing_ok=True)
        await self.cancel(slug)  # a new upload replaces a build of the same name
        status = "queued" if self._turn.locked() else "building"
        waiting = "waiting for the build before it" if status == "queued" else "starting"
        self.registry.set_build(slug, status, waiting)
        job = asyncio.get_running_loop().create_task(
            self._build(slug, task, root, staging, exported), name=f"build-{slug}"
        )
        self._tasks[slug] = job
        job.add_done_callback(lambda done: self._forget(slug, done))
        return status

    def _forget(self, slug: str, job: asyncio.Task[None]) -> None:
        if self._tasks.get(slug) is job:
            del self._tasks[slug]

    async def cancel(self, slug: str) -> None:
        """Stop the build of `slug`, if any: its exporter is killed and reaped, staging removed."""
        job = self._tasks.get(slug)
        if job is not None:
            job.cancel()
            await asyncio.wait({job})

    @staticmethod
    def _check_exported(root: Path) -> None:
        try:
            verify(root, read_manifest(root))
        except ManifestError as exc:
            raise ValidationFailed(
                f"The exported model does not verify: {exc}", details={"field": "body"}
            ) from None

    @staticmethod
    def _checkpoint_task(root: Path) -> str:
        config = root / "config.json"
        if not config.is_file():
            raise ValidationFailed(
                "The zip holds neither an exported model (manifest.json) nor a Hugging Face "
                "checkpoint (config.json).",
                details={"field": "body"},
            )
        try:
            task = guess_task(json.loads(config.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValidationFailed(
                "config.json is not valid JSON.", details={"field": "body"}
            ) from None
        if task is None:
            raise ValidationFailed(
                "Cannot tell the checkpoint's task from its config: give ?task=.",
                details={"field": "task"},
            )
        return task

    async def _build(
        self, slug: str, task: str | None, root: Path, staging: Path, exported: bool
    ) -> None:
        target = self.settings.models_path / slug
        try:
            async with self._turn:
                await self._build_now(slug, task, root, exported, target)
        finally:
            discard(staging)

    async def _build_now(
        self, slug: str, task: str | None, root: Path, exported: bool, target: Path
    ) -> None:
        self.registry.set_build(slug, "building", "exporting" if not exported else "installing")
        leases, timeout = self.leases, self.settings.models.build_timeout_seconds
        if leases is not None and not await asyncio.to_thread(
            leases.acquire, slug, "build_leases", timeout
        ):
            self.registry.set_build(slug, "fail", "another replica is building this slug")
            return
        try:
            if exported:
                await asyncio.to_thread(self._install_exported, root, slug)
            else:
                assert task is not None
                await self._export(root, task, slug)
            entry = await self.registry.add(target)
            if not entry.is_active:
                self.registry.set_build(slug, "fail", entry.message)
        except BuildFailed as exc:
            log.error("build of %s failed: %s", slug, exc)
            self.registry.set_build(slug, "fail", str(exc))
        except Exception as exc:
            log.exception("build of %s failed", slug)
            self.registry.set_build(slug, "fail", f"{type(exc).__name__}: {exc}")
        finally:
            if leases is not None:
                await asyncio.to_thread(leases.release, slug, "build_leases")

    def _install_exported(self, root: Path, slug: str) -> None:
        manifest = read_manifest(root)
        if manifest.slug != slug:
            manifest.slug, manifest.code = slug, slug.upper().replace("-", "_")
            write_manifest(root, manifest)
        self.settings.models_path.mkdir(parents=True, exist_ok=True)
        stage = self.settings.models_path / f".upload-{slug}-{uuid.uuid4().hex[:8]}"
        shutil.move(str(root), stage)
        install_folder(stage, self.settings.models_path / slug)

    async def _export(self, root: Path, task: str, slug: str) -> None:
        cmd = [
            sys.executable,
            "-m",
            "appliance.cli",
            "export",
            str(root),
            "--task",
            task,
            "--name",
            slug,
            "--out",
            str(self.settings.models_path),
        ]
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "APPLIANCE_DATA_DIR": str(self.settings.data_path),
        }
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            # Its own session, so that a cancel kills the exporter's children too. No
            # preexec_fn: forking a threaded server and running Python there can deadlock.
            start_new_session=True,
        )
        self.procs[slug] = proc
        try:
            # It may have exited already, or the system may refuse: it runs anyway.
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, proc.pid, EXPORT_NICENESS)
            output, _ = await asyncio.wait_for(
                proc.communicate(), timeout=self.settings.models.build_timeout_seconds
            )
        except TimeoutError:
            raise BuildFailed(
                f"export took longer than {self.settings.models.build_timeout_seconds} s"
            ) from None
        finally:
            # Cancelled (delete, replace, shutdown) or timed out: never leave it running.
            if proc.returncode is None:
                _kill_group(proc.pid)
                await proc.wait()
            self.procs.pop(slug, None)
        if proc.returncode != 0:
            lines = [ln for ln in output.decode(errors="replace").splitlines() if ln.strip()]
            reason = next(
                (ln for ln in reversed(lines) if "export failed" in ln or "error" in ln.lower()), ""
            )
            raise BuildFailed(
                (reason or (lines[-1] if lines else f"exit {proc.returncode}")).strip()
            )

    async def stop(self) -> None:
        """Cancel every build; their exporters are killed and reaped before this returns."""
        jobs = list(self._tasks.values())
        for job in jobs:
            job.cancel()
        if jobs:
            await asyncio.wait(jobs)

    async def _store(self, body: AsyncIterator[bytes]) -> Path:
        self.uploads.mkdir(parents=True, exist_ok=True)
        path = self.uploads / f"{uuid.uuid4().hex}.zip"
        cap = self.settings.models.max_upload_bytes
        size = 0
        try:
            with open(path, "wb") as out:
                async for chunk in body:
                    size += len(chunk)
                    if size > cap:
                        raise PayloadTooLarge(
                            f"The zip is larger than {cap} bytes.", details={"max_bytes": cap}
                        )
                    await asyncio.to_thread(out.write, chunk)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        if size == 0:
            path.unlink(missing_ok=True)
            raise ValidationFailed(
                "The request body is empty: send the model zip.", details={"field": "body"}
            )
        return path
