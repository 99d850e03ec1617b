"""Request headers read from the raw ASGI pairs: litestar's `headers` view decodes every
header of the request to build itself, which showed in the event loop's profile of a cached
answer; the request path only ever needs one or two values."""

from __future__ import annotations

from typing import Any


def request_header(scope: Any, name: bytes, default: str = "") -> str:
    """The first value of header `name` (lower case, as ASGI gives names)."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")  # type: ignore[no-any-return]
    return default
