"""X-Request-ID on every response: the client's own if it sent a sane one, else a new id.

New ids are UUID-shaped: a random prefix drawn once per process and a counter, unique across
processes and restarts without a call to os.urandom per request (uuid4 is a syscall, which
showed in the event loop's profile under load)."""

from __future__ import annotations

import itertools
import re
import uuid

from litestar.types import ASGIApp, Message, Receive, Scope, Send

_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_PREFIX = str(uuid.uuid4())[:24]  # 8-4-4-4- of a random UUID
_COUNTER = itertools.count(1)


def new_request_id() -> str:
    return f"{_PREFIX}{next(_COUNTER):012x}"


def ensure_request_id(scope: Scope) -> str:
    """The request's id, made once and kept in the scope state."""
    state = scope.setdefault("state", {})  # type: ignore[typeddict-item]
    if "request_id" not in state:
        sent = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode("latin-1")
        state["request_id"] = sent if _CLIENT_ID.match(sent) else new_request_id()
    return state["request_id"]


def request_id_middleware(app: ASGIApp) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        request_id = ensure_request_id(scope)

        header = (b"x-request-id", request_id.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                # A raw pair, unless an error response already carries it: cheaper than the
                # MutableScopeHeaders view, which showed in the event loop's profile.
                headers = list(message.get("headers", ()))
                if not any(name.lower() == b"x-request-id" for name, _ in headers):
                    message["headers"] = [*headers, header]
            await send(message)

        await app(scope, receive, send_with_id)

    return middleware
