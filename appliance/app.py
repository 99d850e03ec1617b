"""create_app(): wires settings, the key store, gateway (limits, cache, usage), the model
registry and the handlers.

State lives in closures and dependency providers built here, opened and closed in the
lifespan; tests build the app with their own settings (and a fake clock for the limiter).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.types import Receive, Scope, Send

from appliance.access_log import AccessLog
from appliance.api import (
    account,
    classify,
    custom,
    docs,
    documents,
    generation,
    jobs,
    models,
    openai,
    operations,
    pipelines,
    rerank,
    summarise,
    tasks,
    tei,
    vision,
)
from appliance.api.head import answer_head
from appliance.api.hot_path import HotPath
from appliance.api.recorder import Observer, request_middleware
from appliance.backends import Backends, open_backends
from appliance.config import Settings
from appliance.console import console_router
from appliance.errors import exception_handler
from appliance.fallbacks import Fallbacks
from appliance.gateway.auth import auth_hook
from appliance.gateway.cache import ResponseCache
from appliance.gateway.keys import KeyStore
from appliance.gateway.ratelimit import RateLimiter
from appliance.inference import Inference
from appliance.jobs.manager import JobManager
from appliance.lifecycle import Lifecycle
from appliance.metrics import Metrics
from appliance.models.builds import Builds
from appliance.models.registry import Registry

log = logging.getLogger("appliance")


def wire_cluster_events(
    backends: Backends, registry: Registry, loop: asyncio.AbstractEventLoop
) -> None:
    """Models changed on another replica: rescan the shared models_dir now. Changes made
    here are announced to the others."""

    def rescan(message: dict[str, str]) -> None:
        if message.get("change") == "removed" and message.get("slug"):
            asyncio.run_coroutine_threadsafe(registry.forget(message["slug"]), loop)
        else:
            asyncio.run_coroutine_threadsafe(registry.sync(), loop)

    def announce(slug: str, change: str) -> None:
        backends.events.publish("models", slug=slug, change=change)

    backends.events.on("models", rescan)
    registry.announce = announce  # type: ignore[method-assign]


def bootstrap_admin_key(settings: Settings, keys: KeyStore) -> None:
    """First start: no keys at all, so make an admin key and write it where the README says."""
    if settings.auth.admin_key_file:
        # An orchestrator hands the key in (a mounted Secret): nothing is written to disk, and a
        # restart with the same file finds its hash already there instead of adding another.
        secret = Path(settings.auth.admin_key_file).read_text().strip()
        if not secret:
            raise ValueError(f"auth.admin_key_file {settings.auth.admin_key_file} is empty")
        if keys.authenticate(secret) is None:
            keys.create("admin", ["admin"], secret=secret)
            log.warning("added the admin key from %s", settings.auth.admin_key_file)
        return
    if not settings.auth.bootstrap_admin_key or keys.list():
        return
    if settings.cluster.enabled:
        # Replicas starting together would each make (and write locally) an admin key.
        log.warning(
            "no API keys exist: create one with `appliance keys create --scopes admin` (it "
            "writes to cluster.database_url) or set auth.admin_key_file on every replica"
        )
        return
    _, secret = keys.create("admin", ["admin"])
    path = settings.data_path / "admin.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
    log.warning("no API keys existed: created an admin key, written to %s", path)


class App(Litestar):
    """litestar's app, with the hot routes' plain requests answered by `hot` (see
    appliance.api.hot_path); None sends every request through litestar."""

    hot: HotPath | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # type: ignore[override]
        hot = self.hot
        if hot is not None and hot.route(scope) is not None:
            scope["app"] = scope["litestar_app"] = self
            await hot(scope, receive, send)  # its recorder gives the scope its state
            return
        if scope["type"] == "http" and scope["method"] == "HEAD":
            await answer_head(super().__call__, scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(
    settings: Settings,
    *,
    keys: KeyStore | None = None,
    limiter: RateLimiter | None = None,
    lifecycle: Lifecycle | None = None,
) -> App:
    settings.data_path.mkdir(parents=True, exist_ok=True)
    lifecycle = lifecycle or Lifecycle()
    metrics = Metrics()
    backends = open_backends(settings, metrics)  # files, or PostgreSQL + Redis: chosen once
    keys = keys or backends.keys
    usage, classifiers = backends.usage, backends.classifiers
    registry = Registry(settings, metrics, alone=lifecycle.alone)
    metrics.watch_models(registry.entries)
    metrics.watch_usage(lambda: usage.dropped)
    cache = ResponseCache(
        settings.cache_path,
        size_limit_bytes=settings.cache.size_limit_mb * 1024 * 1024,
        ttl_seconds=settings.cache.ttl_seconds,
        enabled=settings.cache.enabled,
        scope=settings.cache.scope,
        shared=backends.shared_cache,
        memory_bytes=settings.cache.memory_mb * 1024 * 1024,
    )
    builds = Builds(settings, registry, backends.leases, backends.grants)
    inference = Inference(
        registry,
        cache,
        limiter or backends.limiter,
        usage,
        settings.limits,
        Fallbacks(settings.fallbacks),
    )
    access = AccessLog(settings.server.log_format)
    observer = Observer(usage, metrics, access)
    job_manager = JobManager(
        settings,
        inference,
        keys,
        usage,
        classifiers,
        metrics,
        leases=backends.leases,
        pipelines=backends.pipelines,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        await asyncio.to_thread(backends.start)
        if backends.cluster or backends.workers > 1:  # replicas, or workers on one box
            wire_cluster_events(backends, registry, asyncio.get_running_loop())
        await asyncio.to_thread(bootstrap_admin_key, settings, keys)
        await asyncio.to_thread(usage.start)
        await registry.start()
        await job_manager.start()  # resumes the jobs that were running
        try:
            yield
        finally:
            await job_manager.stop()  # checkpoints them first: they resume at the next start
            await builds.stop()
            await registry.stop()
            await asyncio.to_thread(usage.stop)
            await asyncio.to_thread(cache.close)  # waits for queued cache writes
            await asyncio.to_thread(backends.stop)
            access.flush()

    def provide(value: Any) -> Provide:
        return Provide(lambda: value, use_cache=True, sync_to_thread=False)

    services = tasks.Services(inference, settings, classifiers)
    app = App(
        route_handlers=[
            operations.healthz,
            operations.readyz,
            operations.metrics_handler(settings.auth.open_metrics),
            *models.ROUTES,
            *tasks.ROUTES,
            *classify.ROUTES,
            *openai.ROUTES,
            *custom.ROUTES,
            *summarise.ROUTES,
            *generation.ROUTES,
            *vision.ROUTES,
            *rerank.ROUTES,
            *tei.ROUTES,
            *jobs.ROUTES,
            *pipelines.ROUTES,
            *documents.ROUTES,
            account.list_keys,
            account.create_key,
            account.revoke_key,
            account.balance,
            account.usage_summary,
            account.request_logs,
            docs.openapi_json,
            docs.swagger_ui,
            docs.assets_router(),
            *console_router(keys, settings.data_path, backends.shared_secret("console")),
        ],
        dependencies={
            "settings": provide(settings),
            "registry": provide(registry),
            "builds": provide(builds),
            "inference": provide(inference),
            "keys": provide(keys),
            "usage": provide(usage),
            "classifiers": provide(classifiers),
            "pipelines": provide(backends.pipelines),
            "jobs": provide(job_manager),
            "metrics": provide(metrics),
            "observer": provide(observer),
            "lifecycle": provide(lifecycle),
            "backends": provide(backends),
        },
        # 404 and 405 are raised by the router before any handler: they need their own keys.
        exception_handlers={
            404: exception_handler,
            405: exception_handler,
            Exception: exception_handler,
        },
        state=State({"services": services}),
        before_request=auth_hook(keys),
        middleware=[request_middleware(observer)],
        request_max_body_size=settings.server.max_body_bytes,
        openapi_config=docs.openapi_config(),
        lifespan=[lifespan],
        logging_config=None,  # logging is configured once, by appliance.logs
    )
    app.hot = HotPath(
        app,
        functools.partial(Litestar.__call__, app),  # what `hot` hands over goes to litestar
        keys,
        services,
        observer,
        settings.server.max_body_bytes,
    )
    return app
