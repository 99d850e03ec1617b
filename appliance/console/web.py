"""What every console route shares: the session guard, template rendering, the security
headers and the error pages. Errors are mapped by appliance.errors' one handler and only
dressed here (an HTML page, an htmx fragment, or that handler's JSON for console.js)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from litestar import Request, Response
from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler
from litestar.response import Redirect

from appliance import __version__
from appliance.console.session import COOKIE, CSRF_FIELD, CSRF_HEADER, Sessions
from appliance.errors import ApplianceError, Forbidden, exception_handler
from appliance.gateway.keys import ApiKey

HERE = Path(__file__).parent
TEMPLATES = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)
TEMPLATES.filters["tojson_attr"] = lambda value: json.dumps(value, separators=(",", ":"))

SECURITY_HEADERS = {
    # Everything the console loads is vendored in the package: nothing from elsewhere.
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'; "
    "base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

# (path, label, scope a key needs to see it)
NAV = (
    ("/console", "Overview", "any"),
    ("/console/models", "Models", "admin"),
    ("/console/keys", "Keys", "admin"),
    ("/console/usage", "Usage", "any"),
    ("/console/logs", "Logs", "any"),
    ("/console/jobs", "Jobs", "any"),
    ("/console/playground", "Playground", "predict"),
)


@dataclass
class Console:
    """The console's own state: its sessions (signing secret) and templates."""

    sessions: Sessions

    def page(
        self, request: Request[Any, Any, Any], template: str, status: int = 200, **context: Any
    ) -> Response[str]:
        key: ApiKey | None = request.state.get("api_key")
        session = request.state.get("console_session")
        html = TEMPLATES.get_template(template).render(
            key=key,
            csrf=self.sessions.csrf_token(session) if session else "",
            nav=[(p, label) for p, label, scope in NAV if key and key.allows_scope(scope)],
            path=request.url.path,
            version=__version__,
            **context,
        )
        return Response(html, status_code=status, media_type="text/html; charset=utf-8")


class SignInRequired(Exception):
    """No live session: pages redirect to the sign-in form, htmx and scripts get a 401."""


def guard(console: Console) -> Any:
    """Routes say who may use them with opt={"console": scope}; this checks the session (the
    key re-read on every request), the scope and, on every POST, the CSRF token."""

    async def check(
        connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
    ) -> None:
        needed = handler.opt.get("console")
        if needed is None:
            return
        session = connection.cookies.get(COOKIE)
        key = console.sessions.key_of(session)
        if key is None or session is None:
            raise SignInRequired()
        connection.state.api_key = key
        connection.state.console_session = session
        if connection.scope["method"] == "POST":
            token = connection.headers.get(CSRF_HEADER)
            if token is None and isinstance(connection, Request):
                content_type = connection.headers.get("content-type", "")
                if content_type.startswith(("application/x-www-form-urlencoded", "multipart/")):
                    token = (await connection.form()).get(CSRF_FIELD)
            if not console.sessions.csrf_ok(session, token):
                raise Forbidden("The form's CSRF token is missing or wrong: reload the page.")
        if not key.allows_scope(needed):
            raise Forbidden(
                f"This page needs a key with the '{needed}' scope.",
                details={"required_scope": needed, "key_scopes": key.scopes},
            )

    return check


def after_request(response: Response[Any]) -> Response[Any]:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def static_headers(response: Response[Any]) -> Response[Any]:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    return response


def _wants_json(request: Request[Any, Any, Any]) -> bool:
    return "application/json" in request.headers.get("accept", "")


def error_handler(console: Console) -> Any:
    def handle(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
        if isinstance(exc, SignInRequired):
            if request.headers.get("hx-request"):
                return Response("", status_code=401, headers={"HX-Redirect": "/console/login"})
            if _wants_json(request) or request.method != "GET":
                exc = ApplianceError("Sign in again: the console session ended.")
                exc.status_code, exc.code = 401, "UNAUTHORIZED"  # type: ignore[misc]
                return after_request(exception_handler(request, exc))
            return after_request(Redirect("/console/login", status_code=303))
        answer = exception_handler(request, exc)  # the one mapping to status and error body
        if _wants_json(request):
            return after_request(answer)
        body = answer.content if isinstance(answer.content, dict) else {}
        template = "error_fragment.html" if request.headers.get("hx-request") else "error.html"
        return after_request(console.page(request, template, status=answer.status_code, error=body))

    return handle
