"""What every inference handler shares: the Call for a request, and the answer with the
response headers of API.md (cache, tokens, rate limits).

The answer goes out as raw header pairs and the body encoded once: litestar's generic
response path re-scanned every header it set (`setdefault` over a decoded copy of the
list, about fifty decodes per answer) and was a sixth of a cached answer's cost (py-spy
under wrk, c=8). Handlers still declare `Response[...]`, which is what the OpenAPI document
is built from."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response
from litestar.serialization import encode_json
from litestar.types import Receive, Scope, Send

from appliance.gateway.auth import current_key
from appliance.headers import request_header
from appliance.inference import Call, Outcome


def call_for(request: Request[Any, Any, Any]) -> Call:
    """The request's Call, kept in its state so the usage log can read what it did."""
    call = Call.for_request(current_key(request), request_header(request.scope, b"cache-control"))
    request.state.call = call
    return call


class _Sent:
    """The ASGI app litestar runs for an ApiResponse: two messages, nothing else."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": False})


class ApiResponse(Response[Any]):
    """A JSON answer whose headers are raw (lower-case name, value) byte pairs."""

    __slots__ = ("raw_headers",)

    def __init__(
        self, content: Any, status_code: int, raw_headers: list[tuple[bytes, bytes]]
    ) -> None:
        super().__init__(content, status_code=status_code)
        self.raw_headers = raw_headers

    def to_asgi_response(  # type: ignore[override]
        self, app: Any, request: Request[Any, Any, Any], **kwargs: Any
    ) -> Any:
        if kwargs.get("headers") or kwargs.get("cookies") or kwargs.get("is_head_response"):
            # Headers or cookies set on a router layer, or HEAD: litestar's general path.
            self.headers = {k.decode(): v.decode() for k, v in self.raw_headers}
            return super().to_asgi_response(app, request, **kwargs)
        return self.sent()

    def sent(self) -> _Sent:
        """The answer as the ASGI app that sends it."""
        body = encode_json(self.content)
        headers = [
            *self.raw_headers,
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        return _Sent(self.status_code, headers, body)


def inference_response(body: Any, outcome: Outcome, status_code: int = 200) -> Response[Any]:
    limits = outcome.limits
    headers = [
        (b"x-cache", outcome.cache_status.encode()),
        (b"x-tokens-used", str(outcome.tokens).encode()),
        (b"x-model", outcome.model.slug.encode()),
        (b"x-ratelimit-limit-requests", str(limits.limit_requests).encode()),
        (b"x-ratelimit-remaining-requests", str(limits.remaining_requests).encode()),
        (b"x-ratelimit-limit-tokens", str(limits.limit_tokens).encode()),
        (b"x-ratelimit-remaining-tokens", str(limits.remaining_tokens).encode()),
        (b"x-ratelimit-reset", str(limits.reset).encode()),
    ]
    if outcome.cache_key:
        headers.append((b"x-cache-key", outcome.cache_key.encode()))
    if outcome.cache_age is not None:
        headers.append((b"x-cache-age", str(outcome.cache_age).encode()))
    if outcome.truncated:
        headers.append((b"x-truncated", b"true"))
    return ApiResponse(body, status_code, headers)
