"""The web console at /console: server-rendered pages (Jinja2) with htmx and uPlot, every
asset vendored in static/ (licences beside them), served under a `default-src 'self'` CSP.

It is a client of the code the JSON API runs, not a second API; its routes stay out of the
OpenAPI document."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from litestar import Router
from litestar.datastructures import CacheControlHeader
from litestar.di import Provide
from litestar.static_files import create_static_files_router

from appliance.console import actions, pages, playground
from appliance.console.session import Sessions
from appliance.console.web import (
    HERE,
    SECURITY_HEADERS,
    Console,
    SignInRequired,
    after_request,
    error_handler,
    guard,
    static_headers,
)
from appliance.errors import ApplianceError
from appliance.gateway.keys import KeyStore

SECRET_FILE = "console.secret"


def console_router(
    keys: KeyStore, data_path: Path, shared_secret: Callable[[], bytes] | None = None
) -> list[Router]:
    """The console's routes and its static files, for create_app's route list."""
    sessions = Sessions(keys, data_path / SECRET_FILE, shared_secret=shared_secret)
    console = Console(sessions)
    handle = error_handler(console)
    routes = Router(
        path="/",
        route_handlers=[*pages.ROUTES, *actions.ROUTES, *playground.ROUTES],
        dependencies={"console": Provide(lambda: console, use_cache=True, sync_to_thread=False)},
        guards=[guard(console)],
        after_request=after_request,
        exception_handlers={SignInRequired: handle, ApplianceError: handle},
        include_in_schema=False,
    )
    static = create_static_files_router(
        path="/console/static",
        directories=[HERE / "static"],
        include_in_schema=False,
        # Vendored files change only with the package: caching them for an hour is safe.
        cache_control=CacheControlHeader(max_age=3600),
        after_request=static_headers,
        name="console-static",
    )
    return [routes, static]


__all__ = ["SECURITY_HEADERS", "console_router"]
