"""Liveness and readiness (open endpoints)."""

from __future__ import annotations

from typing import Any

from litestar import Response, get

from appliance import __version__
from appliance.models.registry import Registry


@get("/healthz", tags=["operations"])
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok", "version": __version__}


@get("/readyz", tags=["operations"])
async def readyz(registry: Registry) -> Response[dict[str, Any]]:
    """200 once start-up has loaded and warmed the models. Models that failed are listed with
    the reason (the others serve: status "degraded"); 503 before start-up ends or when no
    model can serve."""
    models = [
        {"slug": e.slug, "status": e.status, **({"message": e.message} if e.message else {})}
        for e in registry.entries()
    ]
    serving = [m for m in models if m["status"] == "ready"]
    if not registry.started or not serving:
        status, code = ("starting" if not registry.started else "no-models"), 503
    else:
        status, code = ("ready" if len(serving) == len(models) else "degraded"), 200
    headers = {"Retry-After": "5"} if code == 503 else {}
    return Response({"status": status, "models": models}, status_code=code, headers=headers)
