"""OpenAPI schema at /openapi.json and Swagger UI at /docs, with assets served from the
installed swagger-ui bundle: the appliance runs air-gapped, so nothing comes from a CDN.

litestar's own schema router stays under /schema (mounting it at "/" would make its
catch-all not-found page answer every unknown path); /docs and /openapi.json render from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
        "Authenticate with `Authorization: Bearer <key>` or `x-api-key: <key>`.",
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
    return request.app.openapi_schema.to_schema()


@get("/openapi.json", include_in_schema=False, media_type="application/vnd.oai.openapi+json")
async def openapi_json(request: Request[Any, Any, Any]) -> Response[bytes]:
    return Response(SWAGGER.render_json(request, _schema(request)))


@get("/docs", include_in_schema=False, media_type="text/html")
async def swagger_ui(request: Request[Any, Any, Any]) -> Response[bytes]:
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
