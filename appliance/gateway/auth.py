"""Authentication: `Authorization: Bearer <key>` or `x-api-key: <key>`, then scope.

Handlers declare the scope they need with `opt={"scope": ...}`; handlers without one are open.
It runs as the app's before_request hook, not as a litestar guard: litestar copies the route
handler object for every guard call, which was 13% of the event loop's time on a cached
answer (py-spy under wrk, c=8).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection

from appliance.errors import Forbidden, Unauthorized
from appliance.gateway.keys import ApiKey, KeyStore


def presented_secret(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    """A request is judged by the credential it presents first: `Authorization` when it has
    one (anything but a non-empty Bearer value fails), else `x-api-key`. A bad Authorization
    beside a good x-api-key is a 401, not a silent fall-back."""
    authorization = None
    api_key = None
    for key, value in connection.scope["headers"]:
        if key == b"authorization":
            authorization = value.decode("latin-1")
            break
        if key == b"x-api-key" and api_key is None:
            api_key = value.decode("latin-1")
    if authorization is not None:
        scheme, _, secret = authorization.partition(" ")
        if scheme.lower() == "bearer" and secret.strip():
            return secret.strip()
        return ""  # not a Bearer credential: matches no key, 401
    return api_key or None


def authorize(keys: KeyStore, connection: ASGIConnection[Any, Any, Any, Any], scope: str) -> ApiKey:
    """The live key the request presents, if it has `scope`; 401 / 403 otherwise."""
    secret = presented_secret(connection)
    if secret is None:
        raise Unauthorized("Missing API key: send `Authorization: Bearer <key>` or `x-api-key`.")
    key = keys.authenticate(secret)
    if key is None:
        raise Unauthorized("Invalid, revoked or expired API key.")
    if not key.allows_scope(scope):
        raise Forbidden(
            f"This API key lacks the '{scope}' scope.",
            details={"required_scope": scope, "key_scopes": key.scopes},
        )
    return key


def auth_hook(keys: KeyStore) -> Callable[[Request[Any, Any, Any]], Awaitable[None]]:
    """The app's before_request hook: it runs after routing (the handler's `opt` is known),
    before the body is read, inside the route's error handling like a guard would."""

    async def before_request(request: Request[Any, Any, Any]) -> None:
        required = request.route_handler.opt.get("scope")
        if required is not None:
            request.state.api_key = authorize(keys, request, required)

    return before_request


def current_key(connection: ASGIConnection[Any, Any, Any, Any]) -> ApiKey:
    return connection.state.api_key
