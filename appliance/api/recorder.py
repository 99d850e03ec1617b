"""ASGI middleware that observes each API request once it is answered: a usage record (written
by the usage log's own thread), Prometheus metrics, and one JSON access-log line. Never the
request's headers or body: no secret can reach the logs."""

from __future__ import annotations

import logging
import time
from typing import Any

from litestar.types import ASGIApp, Message, Receive, Scope, Send

from appliance.api.request_id import ensure_request_id
from appliance.gateway.usage import Record, UsageLog
from appliance.metrics import Metrics

access_log = logging.getLogger("appliance.access")

# Operational and documentation paths are not API usage, nor are the console's pages (its
# playground records its runs itself).
UNRECORDED_PREFIXES = (
    "/healthz",
    "/readyz",
    "/metrics",
    "/docs",
    "/openapi.json",
    "/schema",
    "/console",
)


def request_recorder(usage: UsageLog, metrics: Metrics) -> Any:
    def middleware_factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http" or scope["path"].startswith(UNRECORDED_PREFIXES):
                await app(scope, receive, send)
                return
            start = time.perf_counter()
            status = 500

            async def capture(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                await app(scope, receive, capture)
            finally:
                seconds = time.perf_counter() - start
                call = scope.get("state", {}).get("call")
                settled = getattr(call, "settled", None)
                if settled is not None and not settled.done():
                    # A stream whose client left: its tokens are known when the model stops
                    # (at the next token), so record it then, once, with the real count.
                    settled.add_done_callback(
                        lambda _: observe(scope, status, seconds, usage, metrics)
                    )
                else:
                    observe(scope, status, seconds, usage, metrics)

        return middleware

    return middleware_factory


def observe(scope: Scope, status: int, seconds: float, usage: UsageLog, metrics: Metrics) -> None:
    state = scope.get("state", {})
    key = state.get("api_key")
    call = state.get("call")
    model = call.model if call and call.model else None
    tokens = call.tokens if call else 0
    cache = call.cache_status if call else None
    request_id = ensure_request_id(scope)
    endpoint = f"{scope['method']} {scope.get('path_template') or scope['path']}"

    usage.record(
        Record(
            ts=time.time(),
            key_id=key.id if key else None,
            endpoint=f"{scope['method']} {scope['path']}",
            model=model,
            status=status,
            latency_ms=seconds * 1000,
            tokens=tokens,
            cached=cache == "HIT",
            request_id=request_id,
        )
    )
    metrics.requests.labels(endpoint, model or "", str(status)).inc()
    metrics.request_duration.labels(endpoint).observe(seconds)
    if status == 429:
        metrics.rate_limited.inc()
    if model and tokens:
        metrics.tokens.labels(model).inc(tokens)
    if cache == "HIT":
        metrics.cache_hits.inc()
    elif cache == "MISS":
        metrics.cache_misses.inc()
    access_log.info(
        "request",
        extra={
            "request_id": request_id,
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "latency_ms": round(seconds * 1000, 2),
            "key_id": key.id if key else None,
            "model": model,
            "tokens": tokens,
            "cache": cache,
        },
    )
