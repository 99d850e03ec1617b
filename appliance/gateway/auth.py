"""Authentication guard: `Authorization: Bearer <key>` or `x-api-key: <key>`, then scope.

Handlers declare the scope they need with `opt={"scope": ...}`; handlers without one are open.
"""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.types import Guard

from appliance.errors import Forbidden, Unauthorized
from appliance.gateway.keys import ApiKey, KeyStore


def presented_secret(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    header = connection.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return connection.headers.get("x-api-key") or None


def auth_guard(keys: KeyStore) -> Guard:
    # async: litestar runs a sync guard in a worker thread, a thread hop per request for a
    # check that takes microseconds (a stat of the keys file and a dict lookup).
    async def guard(
        connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
    ) -> None:
        scope = handler.opt.get("scope")
        if scope is None:
            return
        secret = presented_secret(connection)
        if secret is None:
            raise Unauthorized(
                "Missing API key: send `Authorization: Bearer <key>` or `x-api-key`."
            )
        key = keys.authenticate(secret)
        if key is None:
            raise Unauthorized("Invalid, revoked or expired API key.")
        if not key.allows_scope(scope):
            raise Forbidden(
                f"This API key lacks the '{scope}' scope.",
                details={"required_scope": scope, "key_scopes": key.scopes},
            )
        connection.state.api_key = key

    return guard


def current_key(connection: ASGIConnection[Any, Any, Any, Any]) -> ApiKey:
    return connection.state.api_key
