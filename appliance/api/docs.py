"""OpenAPI schema at /openapi.json and Swagger UI at /docs, with assets served from the
installed swagger-ui bundle: the appliance runs air-gapped, so nothing comes from a CDN.

litestar's own schema router stays under /schema (mounting it at "/" would make its
catch-all not-found page answer every unknown path); /docs and /openapi.json render from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from litestar import Request, Response, get
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import (
    Components,
    OpenAPIFormat,
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
    SecurityScheme,
)
from litestar.router import Router
from litestar.static_files import create_static_files_router

from appliance import __version__
from appliance.api.schemas import EXACTLY_ONE
from appliance.metrics import CONTENT_TYPE

ASSETS = "/docs/assets"
# The four files of swagger-ui 5.31.0's dist that the page loads (Apache-2.0, LICENSE beside
# them), shipped in the package: 1.9 MB instead of the 11.6 MB swagger-ui-bundle wheel, and
# the docs page never reaches for a CDN.
swagger_ui_path = Path(__file__).parent / "swagger"

SWAGGER = SwaggerRenderPlugin(
    path="/swagger",
    js_url=f"{ASSETS}/swagger-ui-bundle.js",
    css_url=f"{ASSETS}/swagger-ui.css",
    standalone_preset_js_url=f"{ASSETS}/swagger-ui-standalone-preset.js",
    favicon=f"<link rel='icon' type='image/png' href='{ASSETS}/favicon-32x32.png'>",
)


def openapi_config() -> OpenAPIConfig:
    return OpenAPIConfig(
        title="appliance",
        version=__version__,
        description="Offline inference appliance: INT8 ONNX models behind a hosted-style API. "
        "Authenticate with `Authorization: Bearer <key>` or `x-api-key: <key>`. "
        "No key is needed for /healthz, /readyz, /metrics (unless `auth.open_metrics` is false), "
        "/docs and /openapi.json: their operations declare `security: []`.",
        path="/schema",
        render_plugins=[SWAGGER, JsonRenderPlugin()],
        components=Components(
            security_schemes={
                "bearer": SecurityScheme(type="http", scheme="bearer", description="API key"),
                "apiKey": SecurityScheme(
                    type="apiKey", name="x-api-key", security_scheme_in="header"
                ),
            }
        ),
        security=[{"bearer": []}, {"apiKey": []}],
    )


def _schema(request: Request[Any, Any, Any]) -> dict[str, Any]:
    doc = request.app.openapi_schema.to_schema()
    doc = declare_shapes(request_bodies(doc, _body_structs(request)))
    return declare_responses(doc, _handler_opts(request))


def _body_structs(request: Request[Any, Any, Any]) -> list[type[msgspec.Struct]]:
    found: dict[str, type[msgspec.Struct]] = {}
    for route in request.app.routes:
        for handler in getattr(route, "route_handlers", []):
            data = handler.parsed_fn_signature.parameters.get("data")
            kind = getattr(data, "annotation", None)
            if isinstance(kind, type) and issubclass(kind, msgspec.Struct):
                found[kind.__name__] = kind
    return [found[name] for name in sorted(found)]


def request_bodies(doc: dict[str, Any], structs: list[type[msgspec.Struct]]) -> dict[str, Any]:
    """Request body schemas as msgspec itself states them: litestar's generator drops the
    constraints (lengths, ranges, patterns) of a union's members, e.g. the minItems of
    `str | Annotated[list[str], Meta(min_length=1)]`, so its document allowed what the
    decoder refuses."""
    _, components = msgspec.json.schema_components(
        structs, ref_template="#/components/schemas/{name}"
    )
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in components.items():
        if name in schemas:
            schemas[name] = schema
    return doc


def declare_shapes(doc: dict[str, Any]) -> dict[str, Any]:
    """The either/or rules bodies carry (api.schemas.exactly_one) as a oneOf: one branch per
    field, each requiring that field with its non-null type."""
    schemas = doc.get("components", {}).get("schemas", {})
    for name, fields in EXACTLY_ONE.items():
        schema = schemas.get(name)
        if schema is None:
            continue
        branches = []
        for f in fields:
            prop = schema["properties"][f]
            options = prop.get("anyOf") or prop.get("oneOf") or [prop]
            types = [t for t in options if t != {"type": "null"}]
            branches.append({"required": [f], "properties": {f: types[0]}})
        schema["oneOf"] = branches
    return doc


# The one error body every failure carries (API.md), declared once and referenced by every
# operation: litestar's default 400 ({detail, status_code}) is not what the server sends.
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error", "code", "message", "details", "docs_url", "request_id"],
    "properties": {
        "error": {"type": "string", "description": "`code` in kebab case."},
        "code": {"type": "string", "description": "Stable machine-readable code."},
        "message": {"type": "string"},
        "details": {"type": "object", "additionalProperties": True},
        "docs_url": {"type": "string"},
        "request_id": {"type": ["string", "null"]},
    },
}
_STR = {"schema": {"type": "string"}}
_INT = {"schema": {"type": "integer"}}
REQUEST_ID = {"X-Request-ID": {**_STR, "description": "The request's id (also in bodies)."}}
RETRY_AFTER = {"Retry-After": {**_INT, "description": "Seconds to wait before retrying."}}
RATE_LIMIT = {
    name: _STR
    for name in (
        "X-RateLimit-Limit-Requests",
        "X-RateLimit-Remaining-Requests",
        "X-RateLimit-Limit-Tokens",
        "X-RateLimit-Remaining-Tokens",
        "X-RateLimit-Reset",
    )
}
INFERENCE = {
    **RATE_LIMIT,
    "X-Cache": {**_STR, "description": "HIT, MISS or BYPASS."},
    "X-Cache-Key": _STR,
    "X-Cache-Age": _INT,
    "X-Tokens-Used": _INT,
    "X-Model": _STR,
    "X-Truncated": _STR,
}
# Statuses any operation can answer (auth, scope, unknown model, body limits, validation,
# rate limits, quota, overload, faults), plus those only a key-protected route gives.
_ERRORS = {
    400: "Bad request or invalid JSON.",
    404: "Not found.",
    405: "Method not allowed (`Allow` lists the path's methods).",
    413: "Request body too large.",
    415: "Unsupported media type.",
    422: "Invalid request body or parameters.",
    500: "Internal error.",
    503: "Overloaded, draining or model unavailable.",
}
_KEYED_ERRORS = {
    401: "Missing or invalid API key.",
    402: "Token quota exhausted.",
    403: "The API key lacks the scope.",
    409: "Conflict.",
    429: "Rate limit, or too many jobs.",
    501: "Not available on this appliance.",
    504: "Timed out.",
    507: "Insufficient storage.",
}
METRICS_MEDIA = CONTENT_TYPE  # litestar adds the charset
OPENAPI_MEDIA = "application/vnd.oai.openapi+json"
# Open routes whose 200 is not JSON of a handler's return type: what they really send.
_OPEN_CONTENT = {
    "/metrics": {METRICS_MEDIA: {"schema": {"type": "string"}}},
    "/openapi.json": {OPENAPI_MEDIA: {"schema": {"type": "object"}}},
    "/docs": {"text/html": {"schema": {"type": "string"}}},
}
_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


def _handler_opts(request: Request[Any, Any, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(OpenAPI path, method) -> the handler's opt, so docs follow the auth guard's rules."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for route in request.app.routes:
        for handler in getattr(route, "route_handlers", []):
            for method in getattr(handler, "http_methods", ()):
                out[(route.path_format, method.lower())] = dict(handler.opt)
    return out


def declare_responses(
    doc: dict[str, Any], opts: dict[tuple[str, str], dict[str, Any]]
) -> dict[str, Any]:
    """Every operation declares every status it can give, with the one error body and the
    headers the server sets; open routes (no scope) declare `security: []`."""
    doc.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    error_ref = {"$ref": "#/components/schemas/Error"}
    for path, item in doc.get("paths", {}).items():
        for method in _METHODS:
            op = item.get(method)
            if op is None:
                continue
            opt = opts.get((path, method), {})
            scope = opt.get("scope")
            inference = scope == "predict" and method == "post"
            errors = dict(_ERRORS)
            if scope is None:
                op["security"] = []
            else:
                errors.update(_KEYED_ERRORS)
            responses = op.setdefault("responses", {})
            for code, response in responses.items():
                if code.startswith(("4", "5")):
                    continue
                headers = response.setdefault("headers", {})
                headers.update(REQUEST_ID)
                if inference:
                    headers.update(INFERENCE)
                if path in _OPEN_CONTENT:
                    response["content"] = _OPEN_CONTENT[path]
            for status, description in errors.items():
                headers = dict(REQUEST_ID)
                if status in (429, 503):
                    headers.update(RETRY_AFTER)
                if status == 405:
                    headers["Allow"] = _STR
                if inference or status == 429:
                    headers.update(RATE_LIMIT)
                responses[str(status)] = {
                    "description": description,
                    "headers": headers,
                    "content": {"application/json": {"schema": error_ref}},
                }
    return doc


@get("/openapi.json", tags=["operations"], media_type=OPENAPI_MEDIA)
async def openapi_json(request: Request[Any, Any, Any]) -> Response[bytes]:
    """This OpenAPI document (no key needed)."""
    return Response(SWAGGER.render_json(request, _schema(request)))


@get("/docs", tags=["operations"], media_type="text/html")
async def swagger_ui(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The API's documentation page, rendered from /openapi.json (no key needed)."""
    return Response(SWAGGER.render(request, _schema(request)))


def assets_router() -> Router:
    return create_static_files_router(
        path=ASSETS, directories=[swagger_ui_path], include_in_schema=False
    )


def raw_body(media_type: str, description: str) -> type[Operation]:
    """An OpenAPI operation whose request body is a raw stream (a zip, NDJSON), which the
    handler reads itself rather than through a typed `data` parameter."""

    @dataclass
    class RawBodyOperation(Operation):
        def __post_init__(self) -> None:
            self.request_body = RequestBody(
                required=True,
                description=description,
                content={
                    media_type: OpenAPIMediaType(
                        schema=Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY)
                    )
                },
            )

    return RawBodyOperation
