"""Running the app under uvicorn with a graceful shutdown: on SIGTERM/SIGINT /readyz turns
503 at once, the listener stops accepting, in-flight requests finish (bounded by
server.shutdown_grace_seconds), then the lifespan flushes the usage log and frees models."""

from __future__ import annotations

import logging
import socket
from types import FrameType

import uvicorn

from appliance.app import create_app
from appliance.config import Settings
from appliance.http_protocol import CorkedHttpToolsProtocol
from appliance.lifecycle import Lifecycle
from appliance.runtime.memory import collect_less_often, limit_malloc_arenas

log = logging.getLogger("appliance.server")


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.lifecycle.draining:
            log.info("shutdown requested: draining in-flight requests")
        self.lifecycle.draining = True
        super().handle_exit(sig, frame)


def _config(settings: Settings, lifecycle: Lifecycle) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(settings, lifecycle=lifecycle),
        host=settings.server.host,
        port=settings.server.port,
        log_config=None,  # appliance.logs already configured logging
        access_log=False,  # the app writes its own access line, with the request id
        timeout_graceful_shutdown=settings.server.shutdown_grace_seconds,
        timeout_keep_alive=settings.server.keep_alive_seconds,
        server_header=False,
        # No proxy in front by default, and the app logs no client address: skip uvicorn's
        # X-Forwarded-* rewriting middleware on every request.
        proxy_headers=False,
        http=type(
            "HttpProtocol",
            (CorkedHttpToolsProtocol,),
            {"read_timeout": settings.server.read_timeout_seconds},
        ),
    )


def _server(settings: Settings, lifecycle: Lifecycle) -> _Server:
    server = _Server(_config(settings, lifecycle), lifecycle)
    lifecycle.connections = server.server_state.connections
    lifecycle.requests = server.server_state.tasks
    return server


def run(settings: Settings) -> None:
    """One process serving (server.workers > 1 goes to appliance.workers.supervisor)."""
    log.info(
        "serving models from %s, state in %s, on http://%s:%d",
        settings.models_path,
        settings.data_path,
        settings.server.host,
        settings.server.port,
    )
    limit_malloc_arenas()
    collect_less_often()
    lifecycle = Lifecycle()
    _server(settings, lifecycle).run()


def serve_worker(settings: Settings, sock: socket.socket) -> None:
    """One of server.workers processes: the same server on its own SO_REUSEPORT socket."""
    limit_malloc_arenas()
    collect_less_often()
    lifecycle = Lifecycle()
    _server(settings, lifecycle).run(sockets=[sock])
