"""Operations endpoints: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import os
from typing import Any

from litestar import Response, get

from appliance import __version__
from appliance.backends import Backends
from appliance.lifecycle import Lifecycle
from appliance.metrics import CONTENT_TYPE, Metrics
from appliance.models.registry import Registry


@get("/healthz", tags=["operations"])
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok", "version": __version__}


@get("/readyz", tags=["operations"])
async def readyz(
    registry: Registry, lifecycle: Lifecycle, backends: Backends
) -> Response[dict[str, Any]]:
    """200 once start-up has loaded and warmed the models. Models that failed are listed
    with their status only, the reason is in the log (the others serve: status "degraded");
    503 before start-up ends, when no model can serve, or once shutdown has begun (so load
    balancers stop sending first)."""
    models = [
        {
            "slug": e.slug,
            "status": e.status,
            # No e.message: it can hold paths and exception text, and /readyz needs no key.
            # It is in the log and, for admins, in GET /v1/models/{slug} (build_message).
            # models.lazy: verified and ready to serve, opened at its first request.
            **({"loaded": False} if e.is_active and e.runner is None else {}),
        }
        for e in registry.entries()
    ]
    serving = [m for m in models if m["status"] == "ready"]
    if lifecycle.draining:
        status, code = "draining", 503
    elif not registry.started:
        status, code = "starting", 503
    elif not serving:
        status, code = "no-models", 503
    else:
        status, code = ("ready" if len(serving) == len(models) else "degraded"), 200
    headers = {"Retry-After": "5"} if code == 503 else {}
    body: dict[str, Any] = {"status": status, "models": models}
    if backends.health is not None:
        # Cluster mode: each shared backend's state. A backend down does not take the replica
        # out of rotation (every replica shares it; on_redis_down decides what requests get).
        body["backends"] = backends.health.states()
    if backends.workers > 1:
        # Which of the server.workers processes answered (each has its own models).
        body["worker_pid"] = os.getpid()
    return Response(body, status_code=code, headers=headers)


def metrics_handler(open_access: bool) -> Any:
    @get("/metrics", tags=["operations"], opt={} if open_access else {"scope": "admin"})
    async def metrics(metrics: Metrics) -> Response[bytes]:
        """Prometheus text format."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return metrics
