"""The registry: every model folder under models_dir, verified against its manifest and loaded.

A folder that fails (no manifest, altered file, unknown task, session error) is kept as a
failed entry with the reason, so /readyz and the models list can say why; the others serve.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.config import Settings
from appliance.errors import ModelNotFound, ModelUnavailable
from appliance.metrics import Metrics
from appliance.models.manifest import Manifest, ManifestError, read_manifest, verify
from appliance.runtime.batcher import Batcher
from appliance.runtime.session import create_session
from appliance.tasks import Runner, build_runner

log = logging.getLogger("appliance.registry")


@dataclass
class ModelEntry:
    slug: str
    folder: Path
    status: str  # "ready" | "fail"
    message: str = ""
    manifest: Manifest | None = None
    runner: Runner | None = None
    batcher: Batcher[Any, Any] | None = field(default=None, repr=False)
    load_seconds: float = 0.0

    @property
    def is_active(self) -> bool:
        return self.status == "ready"

    @property
    def build_status(self) -> str:
        return "success" if self.status == "ready" else "fail"


class Registry:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models_dir = settings.models_path
        self.aliases = dict(settings.aliases)
        self.endpoint_aliases = {k: dict(v) for k, v in settings.endpoint_aliases.items()}
        self._entries: dict[str, ModelEntry] = {}
        self.started = False

    # ---- loading -------------------------------------------------------------------------
    def _load(self, folder: Path) -> ModelEntry:
        start = time.perf_counter()
        slug = folder.name
        try:
            manifest = read_manifest(folder)
            slug = manifest.slug
            verify(folder, manifest)
            session = create_session(folder / manifest.files["model"].path, self.settings.runtime)
            runner = build_runner(folder, manifest, session)
            if self.settings.runtime.warmup:
                runner.warmup()
        except (ManifestError, ValueError, KeyError, OSError) as exc:
            log.error("model %s not loaded: %s", slug, exc)
            return ModelEntry(slug, folder, "fail", message=str(exc))
        except Exception as exc:  # onnxruntime raises its own types for a bad graph
            log.exception("model %s not loaded", slug)
            return ModelEntry(slug, folder, "fail", message=f"{type(exc).__name__}: {exc}")
        took = time.perf_counter() - start
        log.info("model %s (%s) ready in %.2fs", slug, manifest.task, took)
        return ModelEntry(slug, folder, "ready", "", manifest, runner, load_seconds=took)

    def scan(self) -> list[ModelEntry]:
        if not self.models_dir.is_dir():
            log.warning("models dir %s does not exist", self.models_dir)
            return []
        folders = sorted(
            p for p in self.models_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        return [self._load(folder) for folder in folders]

    async def start(self) -> None:
        entries = await asyncio.to_thread(self.scan)
        rt = self.settings.runtime
        for entry in entries:
            if entry.runner is not None:
                runner = entry.runner
                entry.batcher = Batcher(
                    runner.infer,
                    name=entry.slug,
                    max_batch_size=rt.max_batch_size,
                    max_batch_tokens=rt.max_batch_tokens,
                    max_wait_s=rt.max_wait_ms / 1000,
                    max_queue=rt.max_queue,
                    observe=self.metrics.batch_observer(entry.slug) if self.metrics else None,
                )
                entry.batcher.start()
            if entry.slug in self._entries:
                log.error(
                    "two folders claim slug %s; keeping %s",
                    entry.slug,
                    self._entries[entry.slug].folder,
                )
                continue
            self._entries[entry.slug] = entry
        self.started = True

    async def stop(self) -> None:
        for entry in self._entries.values():
            if entry.batcher is not None:
                await entry.batcher.stop()

    async def remove(self, slug: str, *, delete_files: bool = False) -> ModelEntry:
        """Stop routing to the model, let its queued and running work finish, free it, and
        (delete_files) remove its folder."""
        entry = self.get(slug)
        del self._entries[slug]
        if entry.batcher is not None:
            await entry.batcher.drain()
            await entry.batcher.stop()
        entry.runner, entry.batcher = None, None  # the session goes with the last reference
        if delete_files:
            await asyncio.to_thread(shutil.rmtree, entry.folder, True)
        log.info("model %s removed%s", slug, " and its files deleted" if delete_files else "")
        return entry

    # ---- lookup --------------------------------------------------------------------------
    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def get(self, slug: str) -> ModelEntry:
        entry = self._entries.get(slug)
        if entry is None:
            raise ModelNotFound(f"Model '{slug}' not found.", details={"model": slug})
        return entry

    def resolve(self, ref: str, endpoint: str | None = None) -> ModelEntry:
        """A slug or a config alias (the endpoint's own first) to a model that can serve now."""
        aliases = {**self.aliases, **self.endpoint_aliases.get(endpoint or "", {})}
        slug = aliases.get(ref, ref)
        entry = self._entries.get(slug)
        if entry is None:
            if ref in aliases:
                raise ModelNotFound(
                    f"Model alias '{ref}' points to '{slug}', which is not installed.",
                    details={"model": ref, "slug": slug},
                )
            raise ModelNotFound(f"Model '{ref}' not found.", details={"model": ref})
        if not entry.is_active:
            raise ModelUnavailable(
                f"Model '{slug}' failed to load: {entry.message}",
                details={"model": slug, "build_status": entry.build_status},
                retry_after=60,
            )
        return entry
