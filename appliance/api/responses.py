"""What every inference handler shares: the Call for a request, and the response headers
of API.md (cache, tokens, rate limits)."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response

from appliance.gateway.auth import current_key
from appliance.inference import Call, Outcome


def call_for(request: Request[Any, Any, Any]) -> Call:
    """The request's Call, kept in its state so the usage log can read what it did."""
    call = Call.for_request(current_key(request), request.headers.get("cache-control", ""))
    request.state.call = call
    return call


def inference_response(body: Any, outcome: Outcome, status_code: int = 200) -> Response[Any]:
    headers = {
        "X-Cache": outcome.cache_status,
        "X-Tokens-Used": str(outcome.tokens),
        "X-Model": outcome.model.slug,
        **outcome.limits.headers(),
    }
    if outcome.cache_key:
        headers["X-Cache-Key"] = outcome.cache_key
    if outcome.cache_age is not None:
        headers["X-Cache-Age"] = str(outcome.cache_age)
    if outcome.truncated:
        headers["X-Truncated"] = "true"
    return Response(body, status_code=status_code, headers=headers)
