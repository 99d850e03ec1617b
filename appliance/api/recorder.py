"""ASGI middleware that hands one usage record per API request to the usage log (which
writes it on its own thread): status, latency, key, model, tokens, cached, request id."""

from __future__ import annotations

import time
from typing import Any

from litestar.types import ASGIApp, Message, Receive, Scope, Send

from appliance.api.request_id import ensure_request_id
from appliance.gateway.usage import Record, UsageLog

# Operational and documentation paths are not API usage.
UNRECORDED_PREFIXES = ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/schema")


def usage_recorder(usage: UsageLog) -> Any:
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
                state = scope.get("state", {})
                key = state.get("api_key")
                call = state.get("call")
                usage.record(
                    Record(
                        ts=time.time(),
                        key_id=key.id if key else None,
                        endpoint=f"{scope['method']} {scope['path']}",
                        model=call.model if call else None,
                        status=status,
                        latency_ms=(time.perf_counter() - start) * 1000,
                        tokens=call.tokens if call else 0,
                        cached=bool(call and call.cached),
                        request_id=ensure_request_id(scope),
                    )
                )

        return middleware

    return middleware_factory
