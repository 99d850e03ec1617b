"""The hot JSON routes (a text in, vectors or scores out) answered without litestar's
per-request machinery, by the very same work functions, error mapping and request recorder.

Under load on this machine litestar's layers around a handler (its exception middleware,
router, scope state, kwargs and signature model) cost as much event-loop CPU per cached
answer as all of the appliance's own work: a bare litestar route answered at ~100 us of CPU
per request where a bare ASGI function on the same uvicorn took ~30 us (wrk, c=8).

Only a plain request takes this path: POST to one of `HOT`'s exact paths, no query string, a
valid Host, a key that may use the route (checked first, before the body is read, as
litestar's hook does), a JSON body within the size limit that decodes strictly into the
endpoint's body type with no field it does not declare. Anything else (no key, a body litestar
would coerce or refuse, a stream cut short, a path with a trailing slash) is handed to
litestar, with the messages already read replayed, so every refusal and every edge keeps the
one behaviour litestar's route has. The litestar routes stay registered as they are: the
OpenAPI document and every other request use them. The app has no before_send hook, CORS,
allowed hosts, CSRF or compression, which this path would bypass: HotPath refuses such an app.
"""

from __future__ import annotations

import types
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import msgspec
from litestar import Litestar, Request
from litestar._asgi.utils import is_valid_host  # the check litestar's router makes
from litestar.types import Message, Receive, Scope, Send

from appliance.api import openai, tasks, tei
from appliance.api.recorder import Observer, request_middleware
from appliance.api.responses import ApiResponse, inference_response
from appliance.api.tasks import Endpoint, Services, Work
from appliance.errors import exception_handler
from appliance.gateway.auth import authorize
from appliance.gateway.keys import KeyStore
from appliance.headers import request_header
from appliance.inference import Call

HOT: dict[str, Endpoint] = {
    **tasks.ENDPOINTS,
    **openai.ENDPOINTS,
    "/embed": tei.ENDPOINTS["/embed"],
}
"""Paths whose litestar handler is exactly `inference_response(*await run(data, work))`
under a scope check (tests/test_hot_path.py holds every one to its litestar answer)."""

ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _Route(NamedTuple):
    path: str
    decoder: msgspec.json.Decoder[Any]
    endpoint: Endpoint
    handler: Any
    """litestar's route handler: its opt holds the scope; error responses are built with it."""


def _strict(body: type[Any]) -> type[Any]:
    """The body type refusing fields it does not declare. Decoded straight into the type,
    an unknown field is skipped unread, where litestar (which decodes the whole document
    first) refuses an out-of-range number or broken UTF-8 in it: such bodies go to litestar."""
    return types.new_class(body.__name__, (body,), {"forbid_unknown_fields": True})


class HotPath:
    """`route(scope)` says whether a request may take this path; calling it answers one.
    `litestar` is the app's own ASGI entry, for the requests it hands over."""

    def __init__(
        self,
        app: Litestar,
        litestar: ASGIApp,
        keys: KeyStore,
        services: Services,
        observer: Observer,
        max_body_bytes: int,
    ) -> None:
        bypassed = (app.before_send, app.cors_config, app.allowed_hosts, app.csrf_config)
        if any(bypassed) or app.compression_config:
            raise ValueError(
                "the hot path would bypass litestar's before_send, CORS, allowed hosts, CSRF "
                "or compression: build such an app without a HotPath"
            )
        handlers = {
            route.path: handler
            for route in app.routes
            for handler in getattr(route, "route_handlers", ())
            if "POST" in getattr(handler, "http_methods", ())
        }
        self._routes = {
            path: _Route(path, msgspec.json.Decoder(_strict(end.body)), end, handlers[path])
            for path, end in HOT.items()
        }
        self._litestar = litestar
        self._keys, self._services, self._max_body = keys, services, max_body_bytes
        # The recorder observes the whole request, body read and hand-over included, as it
        # does on litestar's route (which then leaves it to this one: see recorder.py).
        self._observed = request_middleware(observer)(self._answer)

    def route(self, scope: Scope) -> _Route | None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope.get("query_string")
            or scope.get("root_path")
        ):
            return None
        route = self._routes.get(scope["path"])
        if route is None:
            return None
        # litestar's router refuses a bad Host before any route (and its recorder) runs.
        host = next((value for name, value in scope["headers"] if name == b"host"), None)
        return route if host is None or is_valid_host(host) else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._observed(scope, receive, send)

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        """What litestar's route does from its before_request hook (auth, before the body
        is read) to the answer, with its exception handling."""
        route = self._routes[scope["path"]]
        try:
            key = authorize(self._keys, _Connection(scope), route.handler.opt["scope"])
        except Exception:  # noqa: BLE001 - litestar's route refuses it, the same way
            await self._litestar(scope, receive, send)
            return
        messages, data = await self._read(scope, receive, route)
        if data is None:
            await self._litestar(scope, _replay(messages, receive), send)
            return
        state = scope["state"]  # type: ignore[typeddict-item]
        state["api_key"] = key
        scope["route_handler"] = route.handler
        scope["path_template"] = route.path
        scope.setdefault("path_params", {})
        try:
            call = state["call"] = Call.for_request(key, request_header(scope, b"cache-control"))
            services = self._services
            work = Work(call, services.inference, services.settings, services.classifiers)
            response: ApiResponse = inference_response(  # type: ignore[assignment]
                *await route.endpoint.run(data, work)
            )
            answer = response.sent()  # encodes the body: a failure is a JSON 500 too
        except Exception as exc:  # noqa: BLE001 - the one mapping to the JSON error body
            request: Request[Any, Any, Any] = Request(scope, receive, send)
            error = exception_handler(request, exc)
            await error.to_asgi_response(None, request)(scope, receive, send)
            return
        await answer(scope, receive, send)

    async def _read(
        self, scope: Scope, receive: Receive, route: _Route
    ) -> tuple[list[Message], Any]:
        """The messages read and the decoded body; None for the body when litestar should
        take the request (it then reads the same messages again)."""
        content_type = request_header(scope, b"content-type")
        if content_type.partition(";")[0].strip().lower() != "application/json":
            return [], None
        length = request_header(scope, b"content-length")
        if length and not (length.isascii() and length.isdigit() and int(length) <= self._max_body):
            return [], None
        messages: list[Message] = []
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages, None  # the client left: litestar's handling of that
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                return messages, None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        try:
            return messages, route.decoder.decode(b"".join(chunks))
        except (msgspec.DecodeError, RecursionError):
            return messages, None  # litestar's decoding gives the error (or coerces)


class _Connection:
    """What `authorize` reads of a connection: its scope."""

    __slots__ = ("scope",)

    def __init__(self, scope: Scope) -> None:
        self.scope = scope


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = deque(messages)

    async def replayed() -> Message:
        return pending.popleft() if pending else await receive()

    return replayed  # type: ignore[return-value]
