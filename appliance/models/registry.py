"""The registry: every model folder under models_dir, verified against its manifest and loaded.

A folder that fails (no manifest, altered file, unknown task, session error) is kept as a
failed entry with the reason, so /readyz and the models list can say why; the others serve.
Models come and go while serving: the folder is watched, uploads are added, deletes remove.
A model is swapped in whole (loaded and warmed first); the one it replaces keeps answering
the requests that already chose it for a grace period, then drains and is freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.config import Settings
from appliance.errors import ModelNotFound, ModelUnavailable
from appliance.metrics import Metrics
from appliance.models.manifest import (
    MANIFEST_FILE,
    Manifest,
    ManifestError,
    read_manifest,
    recover_folders,
    verify,
)
from appliance.runtime.batcher import INLINE_SECONDS, Batcher
from appliance.runtime.session import (
    ARENA_TASKS,
    create_session,
    lone_call_threads,
    plan_streams,
)
from appliance.tasks import Runner, build_runner

log = logging.getLogger("appliance.registry")


@dataclass
class ModelEntry:
    slug: str
    folder: Path
    status: str  # "ready" | "fail" | "building" | "queued" (an upload waiting for its build)
    message: str = ""
    manifest: Manifest | None = None
    runner: Runner | None = None
    batcher: Batcher[Any, Any] | None = field(default=None, repr=False)
    load_seconds: float = 0.0
    streams: int = 1  # model calls run at once
    lone: Runner | None = field(default=None, repr=False)  # a lone request's call (Batcher)

    @property
    def is_active(self) -> bool:
        return self.status == "ready"

    @property
    def build_status(self) -> str:
        return {"ready": "success", "building": "building", "queued": "queued"}.get(
            self.status, "fail"
        )


def _version(folder: Path) -> tuple[int, int, int] | None:
    """Changes whenever the folder's manifest is rewritten or the folder is swapped."""
    try:
        st = (folder / MANIFEST_FILE).stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class Registry:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        *,
        alone: Callable[[], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._alone = alone  # the server answers one request at most (see Batcher)
        self.models_dir = settings.models_path
        self.aliases = dict(settings.aliases)
        self.endpoint_aliases = {k: dict(v) for k, v in settings.endpoint_aliases.items()}
        self._entries: dict[str, ModelEntry] = {}
        self._builds: dict[str, ModelEntry] = {}  # uploads being built, or whose build failed
        self._seen: dict[Path, tuple[int, int, int] | None] = {}
        self._missing: dict[Path, int] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._opening: dict[str, asyncio.Lock] = {}  # lazily loaded models being opened
        self._watcher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.started = False

    # ---- loading -------------------------------------------------------------------------
    def _load(self, folder: Path) -> ModelEntry:
        """Read and verify the model in `folder`, then open it (with models.lazy: at its first
        request, see `ensure_loaded`)."""
        start = time.perf_counter()
        slug = folder.name
        lazy = self.settings.models.lazy
        try:
            manifest = read_manifest(folder)
            if manifest.slug != slug:
                # The folder name is the model's identity on disk (and unique): it wins.
                log.warning(
                    "folder %s holds a manifest for %s: served as %s", slug, manifest.slug, slug
                )
                manifest.slug = slug
            verify(folder, manifest)
            runner, lone = (None, None) if lazy else self._open(folder, manifest)
        except (ManifestError, ValueError, KeyError, OSError) as exc:
            log.error("model %s not loaded: %s", slug, exc)
            return ModelEntry(slug, folder, "fail", message=str(exc))
        except Exception as exc:  # onnxruntime raises its own types for a bad graph
            log.exception("model %s not loaded", slug)
            return ModelEntry(slug, folder, "fail", message=f"{type(exc).__name__}: {exc}")
        took = time.perf_counter() - start
        log.info(
            "model %s (%s) %s in %.2fs",
            slug,
            manifest.task,
            "verified, opens at its first request," if lazy else "ready",
            took,
        )
        workers = self.settings.server.workers  # each worker sizes to its share of the cores
        streams = plan_streams(self.settings.runtime, manifest.task, workers)[0]
        return ModelEntry(
            slug,
            folder,
            "ready",
            "",
            manifest,
            runner,
            load_seconds=took,
            streams=streams,
            lone=lone,
        )

    def _open(self, folder: Path, manifest: Manifest) -> tuple[Runner, Runner | None]:
        """The model's runner, and the one for a lone request's calls (a second session
        with more threads; see appliance.runtime.session), warmed up. That one only where it
        can be used: a serving process, a task of short single texts on the CPU, and a warm
        short call that fits the event loop (INLINE_SECONDS)."""
        workers, rt = self.settings.server.workers, self.settings.runtime
        path = folder / manifest.files["model"].path
        threads = plan_streams(rt, manifest.task, workers)[1]
        session = create_session(path, rt, arena=manifest.task in ARENA_TASKS, threads=threads)
        runner = build_runner(folder, manifest, session)
        if not rt.warmup:
            return runner, None
        runner.warmup()
        lone_threads = lone_call_threads(rt, manifest.task, workers)
        providers = session.get_providers()  # the lone call's session runs on them too
        if (
            self._alone is None  # batch jobs' own processes: never a lone call
            or not lone_threads
            or providers[0] != "CPUExecutionProvider"  # threads are CPU's
        ):
            return runner, None
        started = time.perf_counter()
        runner.warmup()  # a warm short call: does it fit the inline path at all?
        if time.perf_counter() - started > INLINE_SECONDS:
            return runner, None
        try:
            lone_session = create_session(
                path, rt, threads=lone_threads, spin=True, providers=providers
            )
            lone = runner.with_session(lone_session)
            lone.warmup()
        except Exception:  # optional: the model serves without it
            log.exception("model %s: no session of its own for lone calls", folder.name)
            return runner, None
        return runner, lone

    async def ensure_loaded(self, entry: ModelEntry) -> None:
        """Open a lazily loaded model (models.lazy) once; concurrent first requests wait for
        the same load. A model that fails to open is marked failed, as at start."""
        if entry.runner is not None:
            return
        lock = self._opening.setdefault(entry.slug, asyncio.Lock())
        async with lock:
            if entry.runner is not None:
                return
            assert entry.manifest is not None
            start = time.perf_counter()
            try:
                runner, lone = await asyncio.to_thread(self._open, entry.folder, entry.manifest)
            except Exception as exc:
                log.exception("model %s could not be opened", entry.slug)
                entry.status, entry.message = "fail", f"{type(exc).__name__}: {exc}"
                raise ModelUnavailable(
                    f"Model '{entry.slug}' failed to load: {entry.message}",
                    details={"model": entry.slug, "build_status": "fail"},
                    retry_after=60,
                ) from None
            entry.runner, entry.lone = runner, lone
            entry.load_seconds += time.perf_counter() - start
            self._activate(entry)
            log.info(
                "model %s opened at its first request in %.2fs", entry.slug, entry.load_seconds
            )

    def _folders(self) -> list[Path]:
        if not self.models_dir.is_dir():
            return []
        return sorted(
            p for p in self.models_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    def scan(self) -> list[ModelEntry]:
        if not self.models_dir.is_dir():
            log.warning("models dir %s does not exist", self.models_dir)
        else:
            for slug in recover_folders(self.models_dir):
                log.warning("model %s restored from its previous version (swap interrupted)", slug)
        entries = []
        for folder in self._folders():
            self._seen[folder] = _version(folder)
            entries.append(self._load(folder))
        return entries

    def _activate(self, entry: ModelEntry) -> None:
        if entry.runner is None:
            return
        rt = self.settings.runtime
        entry.batcher = Batcher(
            entry.runner.infer,
            name=entry.slug,
            max_batch_size=rt.max_batch_size,
            max_batch_tokens=rt.max_batch_tokens,
            max_wait_s=rt.max_wait_ms / 1000,
            max_queue=rt.max_queue,
            observe=self.metrics.batch_observer(entry.slug) if self.metrics else None,
            streams=entry.streams,
            alone=self._alone if entry.runner.ONE_PASS else None,
            run_alone=entry.lone.infer if entry.lone is not None else None,
        )
        entry.batcher.start()

    def _install(self, entry: ModelEntry) -> None:
        old = self._entries.get(entry.slug)
        if old is not None and old.is_active and not entry.is_active:
            # A broken copy must not take a working model's place: keep serving the old one.
            log.error("model %s keeps serving from %s: %s", entry.slug, old.folder, entry.message)
            return
        self._activate(entry)
        self._entries[entry.slug] = entry
        if entry.is_active:
            self._builds.pop(entry.slug, None)
        if old is not None and old is not entry:
            self._retire(old)

    def _retire(self, entry: ModelEntry, grace: float | None = None) -> None:
        """Let requests that already chose `entry` finish on it, then free it."""

        async def retire() -> None:
            await asyncio.sleep(
                self.settings.models.retire_grace_seconds if grace is None else grace
            )
            if entry.batcher is not None:
                await entry.batcher.drain()
                await entry.batcher.stop()
            entry.runner, entry.lone, entry.batcher = None, None, None

        task = asyncio.get_running_loop().create_task(retire())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def start(self) -> None:
        entries = await asyncio.to_thread(self.scan)
        for entry in entries:
            self._install(entry)
        self.started = True
        if self.settings.models.watch_interval_seconds > 0:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        for task in list(self._retiring):
            task.cancel()
        for entry in self._entries.values():
            if entry.batcher is not None:
                await entry.batcher.stop()

    # ---- changes while serving -----------------------------------------------------------
    async def add(self, folder: Path, *, announce: bool = True) -> ModelEntry:
        """Load (and warm) the model in `folder` off the event loop, then swap it in."""
        entry = await asyncio.to_thread(self._load, folder)
        async with self._lock:
            self._seen[folder] = _version(folder)
            self._install(entry)
        if announce:
            self.announce(entry.slug, "added")
        return entry

    def announce(self, slug: str, change: str) -> None:
        """Cluster mode: replaced by a publish, so other replicas rescan at once instead of
        at their next watch interval (they share models_dir)."""

    async def remove(
        self, slug: str, *, delete_files: bool = False, announce: bool = True
    ) -> ModelEntry:
        """Stop routing to the model; requests that chose it finish; then free it and
        (delete_files) remove its folder."""
        entry = self._entries.get(slug) or self._builds.get(slug)
        if entry is None:
            raise ModelNotFound(f"Model '{slug}' not found.", details={"model": slug})
        async with self._lock:
            self._entries.pop(slug, None)
            self._builds.pop(slug, None)
            self._seen.pop(entry.folder, None)
            if delete_files:
                await asyncio.to_thread(shutil.rmtree, entry.folder, True)
        self._retire(entry, grace=0)
        log.info("model %s removed%s", slug, " and its files deleted" if delete_files else "")
        if announce:
            self.announce(slug, "removed")
        return entry

    def set_build(self, slug: str, status: str, message: str) -> None:
        """Show an upload's build in the models list ("building", or "fail" with why)."""
        self._builds[slug] = ModelEntry(slug, self.models_dir / slug, status, message)

    async def _watch(self) -> None:
        interval = self.settings.models.watch_interval_seconds
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sync()
            except Exception:  # a bad folder must never stop the watcher
                log.exception("models dir scan failed")

    async def forget(self, slug: str) -> None:
        """Another replica removed `slug` (and its folder): stop serving it now rather than
        after two rescans, if its folder is really gone."""
        entry = self._entries.get(slug)
        if entry is not None and not await asyncio.to_thread(entry.folder.exists):
            await self.remove(slug, announce=False)

    async def sync(self) -> None:
        """Pick up folders added or replaced in models_dir, and drop the ones that went."""
        folders = await asyncio.to_thread(self._folders)
        for folder in folders:
            self._missing.pop(folder, None)
            version = await asyncio.to_thread(_version, folder)
            if folder not in self._seen or version != self._seen[folder]:
                log.info(
                    "models dir: %s %s",
                    "new" if folder not in self._seen else "changed",
                    folder.name,
                )
                await self.add(folder, announce=False)
        present = set(folders)
        for entry in list(self._entries.values()):
            if entry.folder in present:
                continue
            # An exporter swaps folders by renaming: gone twice in a row means really gone.
            self._missing[entry.folder] = self._missing.get(entry.folder, 0) + 1
            if self._missing[entry.folder] >= 2:
                self._missing.pop(entry.folder)
                await self.remove(entry.slug, announce=False)

    # ---- lookup --------------------------------------------------------------------------
    def entries(self) -> list[ModelEntry]:
        shown = dict(self._builds)
        shown.update(
            {slug: e for slug, e in self._entries.items() if e.is_active or slug not in shown}
        )
        return list(shown.values())

    def get(self, slug: str) -> ModelEntry:
        entry = self._entries.get(slug) or self._builds.get(slug)
        if entry is None:
            raise ModelNotFound(f"Model '{slug}' not found.", details={"model": slug})
        return entry

    def resolve(self, ref: str, endpoint: str | None = None) -> ModelEntry:
        """A slug or a config alias (the endpoint's own first) to a model that can serve now."""
        aliases = {**self.aliases, **self.endpoint_aliases.get(endpoint or "", {})}
        slug = aliases.get(ref, ref)
        entry = self._entries.get(slug) or self._builds.get(slug)
        if entry is None:
            if ref in aliases:
                raise ModelNotFound(
                    f"Model alias '{ref}' points to '{slug}', which is not installed.",
                    details={"model": ref, "slug": slug},
                )
            raise ModelNotFound(f"Model '{ref}' not found.", details={"model": ref})
        if entry.status in ("building", "queued"):
            raise ModelUnavailable(
                f"Model '{slug}' is being built.",
                details={"model": slug, "build_status": entry.status},
                retry_after=30,
            )
        if not entry.is_active:
            raise ModelUnavailable(
                f"Model '{slug}' failed to load: {entry.message}",
                details={"model": slug, "build_status": entry.build_status},
                retry_after=60,
            )
        return entry
