"""Headers every inference response carries (API.md)."""

from __future__ import annotations

from typing import Any

from litestar import Response

from appliance.inference import Outcome


def inference_response(body: Any, outcome: Outcome, status_code: int = 200) -> Response[Any]:
    headers = {
        "X-Cache": "BYPASS",
        "X-Tokens-Used": str(outcome.tokens),
        "X-Model": outcome.model.slug,
    }
    if outcome.truncated:
        headers["X-Truncated"] = "true"
    return Response(body, status_code=status_code, headers=headers)
