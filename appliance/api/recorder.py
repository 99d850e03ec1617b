"""The one ASGI middleware of every API route: it gives the request its id (X-Request-ID on
the answer) and, once the request is answered, observes it: a usage record (written by the
usage log's own thread), Prometheus metrics, and one access-log line. Never the request's
headers or body: no secret can reach the logs.

One layer rather than two (request id, then recorder), metric children looked up once per
label set, and the access line written in batches: each showed in the event loop's profile
of a cached answer (py-spy under wrk, c=8)."""

from __future__ import annotations

import time
from typing import Any

from litestar.types import ASGIApp, Message, Receive, Scope, Send

from appliance.access_log import AccessLog
from appliance.api.request_id import ensure_request_id
from appliance.gateway.usage import Record, UsageLog
from appliance.metrics import Metrics

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


class Observer:
    """What is done with an answered request: usage record, metrics, access line."""

    def __init__(self, usage: UsageLog, metrics: Metrics, access: AccessLog) -> None:
        self.usage, self.metrics, self.access = usage, metrics, access
        # The metrics' children by label values: `labels()` looked up per request showed in
        # the profile.
        self._requests: dict[tuple[str, ...], Any] = {}
        self._durations: dict[tuple[str, ...], Any] = {}
        self._tokens: dict[tuple[str, ...], Any] = {}

    def __call__(self, scope: Scope, status: int, seconds: float) -> None:
        state = scope.get("state", {})
        key = state.get("api_key")
        call = state.get("call")
        model = call.model if call and call.model else None
        tokens = call.tokens if call else 0
        cache = call.cache_status if call else None
        request_id = ensure_request_id(scope)
        key_id = key.id if key else None
        method, path = scope["method"], scope["path"]
        endpoint = f"{method} {scope.get('path_template') or path}"

        self.usage.record(
            Record(
                ts=time.time(),
                key_id=key_id,
                endpoint=f"{method} {path}",
                model=model,
                status=status,
                latency_ms=seconds * 1000,
                tokens=tokens,
                cached=cache == "HIT",
                request_id=request_id,
            )
        )
        m = self.metrics
        _child(self._requests, m.requests, endpoint, model or "", str(status)).inc()
        _child(self._durations, m.request_duration, endpoint).observe(seconds)
        if status == 429:
            m.rate_limited.inc()
        if model and tokens:
            _child(self._tokens, m.tokens, model).inc(tokens)
        if cache == "HIT":
            m.cache_hits.inc()
        elif cache == "MISS":
            m.cache_misses.inc()
        self.access.write(
            {
                "request_id": request_id,
                "method": method,
                "path": path,
                "status": status,
                "latency_ms": round(seconds * 1000, 2),
                "key_id": key_id,
                "model": model,
                "tokens": tokens,
                "cache": cache,
            }
        )


READ_TIMED_OUT = "read_timed_out"
"""In a request's scope state: the server answered it 408, its body having stalled
(appliance.http_protocol); the app only saw the client leave."""


def _child(children: dict[tuple[str, ...], Any], metric: Any, *labels: str) -> Any:
    child = children.get(labels)
    if child is None:
        child = children[labels] = metric.labels(*labels)
    return child


def request_middleware(observe: Observer) -> Any:
    def middleware_factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            state = scope.setdefault("state", {})  # type: ignore[typeddict-item]
            if state.get("observed"):
                # The hot path's recorder observes this request already: it handed it to
                # litestar's route, which would observe it a second time.
                await app(scope, receive, send)
                return
            state["observed"] = True
            header = (b"x-request-id", ensure_request_id(scope).encode("latin-1"))
            recorded = not scope["path"].startswith(UNRECORDED_PREFIXES)
            start = time.perf_counter()
            status = 500
            answering = False  # the answer's head was sent
            left = False  # the client went before it: recorded as 499 (nginx's "client
            # closed request"), or 408 when the server gave up on a stalled body, never as
            # the 500 the app may try to send to nobody

            async def watched() -> Message:
                nonlocal left
                message = await receive()
                if message["type"] == "http.disconnect" and not answering:
                    left = True
                return message

            async def capture(message: Message) -> None:
                nonlocal status, answering
                if message["type"] == "http.response.start":
                    answering = True
                    status = message["status"]
                    # A raw pair, unless an error response already carries it: cheaper than
                    # the MutableScopeHeaders view.
                    headers = message.get("headers", ())
                    if not any(name == b"x-request-id" for name, _ in headers):
                        message["headers"] = [*headers, header]
                await send(message)

            try:
                await app(scope, watched, capture)
            finally:
                if left:
                    status = 408 if scope.get("state", {}).get(READ_TIMED_OUT) else 499
                if recorded:
                    seconds = time.perf_counter() - start
                    call = scope.get("state", {}).get("call")
                    settled = getattr(call, "settled", None)
                    if settled is not None and not settled.done():
                        # A stream whose client left: its tokens are known when the model
                        # stops (at the next token), so record it then, once, with the real
                        # count.
                        settled.add_done_callback(lambda _: observe(scope, status, seconds))
                    else:
                        observe(scope, status, seconds)

        return middleware

    return middleware_factory
