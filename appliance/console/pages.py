"""The console's pages and the htmx fragments they poll. Each reads the same stores and
functions as the JSON API (Registry and api.models' views, KeyStore, UsageLog, JobManager,
Metrics), scoped the same way: an admin key sees everything, another key only itself."""

from __future__ import annotations

import asyncio
import time
from datetime import date, datetime, timedelta, timezone
from typing import Any

import msgspec
from litestar import Request, Response, get

from appliance.api import operations
from appliance.api.models import TASK_ENDPOINTS, detail
from appliance.backends import Backends
from appliance.console import stats
from appliance.console.playground import SAMPLES, endpoints_for
from appliance.console.web import Console
from appliance.errors import ValidationFailed
from appliance.gateway.auth import current_key
from appliance.gateway.keys import SCOPES, KeyStore
from appliance.gateway.usage import UsageLog
from appliance.jobs.endpoints import JOB_ENDPOINTS
from appliance.jobs.manager import JobManager
from appliance.lifecycle import Lifecycle
from appliance.metrics import Metrics
from appliance.models.registry import Registry

ANY = {"console": "any"}
ADMIN = {"console": "admin"}


def _visible(request: Request[Any, Any, Any], registry: Registry) -> list[Any]:
    key = current_key(request)
    return [detail(e) for e in registry.entries() if key.allows_model(e.slug)]


async def _overview(
    request: Request[Any, Any, Any],
    registry: Registry,
    lifecycle: Lifecycle,
    metrics: Metrics,
    usage: UsageLog,
    backends: Backends,
) -> dict[str, Any]:
    ready = await operations.readyz.fn(registry=registry, lifecycle=lifecycle, backends=backends)
    admin = current_key(request).allows_scope("admin")
    return {
        "health": ready.content["status"],
        "models": _visible(request, registry),
        # Traffic figures cover every key: only an admin sees them (as with /metrics).
        "stats": await asyncio.to_thread(stats.overview, metrics, usage) if admin else None,
    }


@get("/console", opt=ANY)
async def overview_page(
    request: Request[Any, Any, Any],
    console: Console,
    registry: Registry,
    lifecycle: Lifecycle,
    backends: Backends,
    metrics: Metrics,
    usage: UsageLog,
) -> Response[str]:
    data = await _overview(request, registry, lifecycle, metrics, usage, backends)
    return console.page(request, "overview.html", **data)


@get("/console/fragments/overview", opt=ANY)
async def overview_fragment(
    request: Request[Any, Any, Any],
    console: Console,
    registry: Registry,
    lifecycle: Lifecycle,
    backends: Backends,
    metrics: Metrics,
    usage: UsageLog,
) -> Response[str]:
    data = await _overview(request, registry, lifecycle, metrics, usage, backends)
    return console.page(request, "overview_body.html", **data)


@get("/console/models", opt=ADMIN)
async def models_page(
    request: Request[Any, Any, Any], console: Console, registry: Registry
) -> Response[str]:
    return console.page(
        request, "models.html", models=_visible(request, registry), tasks=sorted(TASK_ENDPOINTS)
    )


@get("/console/fragments/models", opt=ADMIN)
async def models_fragment(
    request: Request[Any, Any, Any], console: Console, registry: Registry
) -> Response[str]:
    return console.page(request, "models_table.html", models=_visible(request, registry))


def keys_context(keys: KeyStore, usage: UsageLog) -> dict[str, Any]:
    listed = sorted(keys.list(), key=lambda k: (k.revoked, k.created_at), reverse=False)
    return {
        "keys": [{**k.public(), "spent": usage.spent(k.id)} for k in listed],
        "scopes": SCOPES,
    }


@get("/console/keys", opt=ADMIN)
async def keys_page(
    request: Request[Any, Any, Any], console: Console, keys: KeyStore, usage: UsageLog
) -> Response[str]:
    return console.page(request, "keys.html", **keys_context(keys, usage))


def _day(value: str | None, default: date, field: str) -> date:
    if not value:
        return default
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ValidationFailed(
            f"`{field}` must be a date (YYYY-MM-DD).", details={"field": field}
        ) from None


def _who(request: Request[Any, Any, Any], key_id: str | None) -> str | None:
    """Admins see every key's usage (or the one they pick), other keys their own only."""
    key = current_key(request)
    if key.allows_scope("admin"):
        return key_id or None
    return key.id


@get("/console/usage", opt=ANY)
async def usage_page(
    request: Request[Any, Any, Any],
    console: Console,
    usage: UsageLog,
    keys: KeyStore,
    since: str | None = None,
    until: str | None = None,
    key_id: str | None = None,
) -> Response[str]:
    today = datetime.now(timezone.utc).date()
    first = _day(since, today - timedelta(days=13), "since")
    last = _day(until, today, "until")
    if last < first:
        raise ValidationFailed("`until` is before `since`.", details={"field": "until"})
    who = _who(request, key_id)
    start = datetime.combine(first, datetime.min.time(), timezone.utc).timestamp()
    end = datetime.combine(last + timedelta(days=1), datetime.min.time(), timezone.utc)
    rows = await asyncio.to_thread(usage.usage, who, start, end.timestamp())
    days = [(first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]
    models = sorted({r["model"] or "no model" for r in rows})
    series: dict[str, dict[str, list[int]]] = {
        measure: {m: [0] * len(days) for m in models}
        for measure in ("requests", "tokens", "cached_requests")
    }
    index = {d: i for i, d in enumerate(days)}
    for r in rows:
        for measure, by_model in series.items():
            by_model[r["model"] or "no model"][index[r["date"]]] += r[measure]
    chart = {
        "days": [
            datetime.combine(date.fromisoformat(d), datetime.min.time(), timezone.utc).timestamp()
            for d in days
        ],
        "series": series,
    }
    admin = current_key(request).allows_scope("admin")
    return console.page(
        request,
        "usage.html",
        rows=rows,
        chart=chart,
        since=first.isoformat(),
        until=last.isoformat(),
        key_id=who or "",
        all_keys=[k.public() for k in keys.list()] if admin else [],
        totals={m: sum(sum(v) for v in series[m].values()) for m in series},
    )


def _moment(value: str | None, field: str) -> float | None:
    """A datetime-local input (no zone): read as UTC, as every time the console shows is."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValidationFailed(
            f"`{field}` must be a date and time.", details={"field": field}
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


PAGE = 50


@get("/console/logs", opt=ANY)
async def logs_page(
    request: Request[Any, Any, Any],
    console: Console,
    usage: UsageLog,
    registry: Registry,
    status: str | None = None,
    model: str | None = None,
    since: str | None = None,
    until: str | None = None,
    offset: int = 0,
) -> Response[str]:
    if status and not status.isdigit():
        raise ValidationFailed("`status` must be an HTTP status code.", details={"field": "status"})
    offset = max(0, min(offset, 10**15))
    rows = await asyncio.to_thread(
        usage.logs,
        key_id=_who(request, None),
        status=int(status) if status else None,
        model=model or None,
        since=_moment(since, "since"),
        until=_moment(until, "until"),
        limit=PAGE + 1,
        offset=offset,
    )
    filters = {
        "status": status or "",
        "model": model or "",
        "since": since or "",
        "until": until or "",
    }
    return console.page(
        request,
        "logs.html",
        rows=rows[:PAGE],
        filters=filters,
        models=[m.slug for m in _visible(request, registry)],
        offset=offset,
        previous=max(0, offset - PAGE) if offset else None,
        next=offset + PAGE if len(rows) > PAGE else None,
    )


def jobs_context(request: Request[Any, Any, Any], jobs: JobManager) -> dict[str, Any]:
    return {"jobs": [jobs.view(j) for j in jobs.list(current_key(request))], "now": time.time()}


# Any key sees its own jobs; making, starting and cancelling them needs the jobs scope (the
# actions check it, as the JSON API does), so the upload form shows only for such keys.
@get("/console/jobs", opt=ANY)
async def jobs_page(
    request: Request[Any, Any, Any], console: Console, jobs: JobManager, registry: Registry
) -> Response[str]:
    return console.page(
        request,
        "jobs.html",
        endpoints=[p for p in JOB_ENDPOINTS if p.startswith("/v1/")],
        models=[m.slug for m in _visible(request, registry)],
        **jobs_context(request, jobs),
    )


@get("/console/fragments/jobs", opt=ANY)
async def jobs_fragment(
    request: Request[Any, Any, Any], console: Console, jobs: JobManager
) -> Response[str]:
    return console.page(request, "jobs_table.html", **jobs_context(request, jobs))


@get("/console/playground", opt={"console": "predict"})
async def playground_page(
    request: Request[Any, Any, Any], console: Console, registry: Registry
) -> Response[str]:
    models = [m for m in _visible(request, registry) if m.is_active]
    choices = {m.slug: endpoints_for(m.task) for m in models}
    return console.page(
        request,
        "playground.html",
        models=models,
        choices=msgspec.to_builtins(choices),
        samples=SAMPLES,
        endpoints=sorted({p for paths in choices.values() for p in paths}),
    )


ROUTES = [
    overview_page,
    overview_fragment,
    models_page,
    models_fragment,
    keys_page,
    usage_page,
    logs_page,
    jobs_page,
    jobs_fragment,
    playground_page,
]
