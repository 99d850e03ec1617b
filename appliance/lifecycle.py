"""Process lifecycle shared by the server loop and the app: set when shutdown begins, so
/readyz turns 503 before the listener closes and in-flight work finishes; and the server's
open connections and unanswered requests (a model's batcher runs a lone request's small call
on the event loop itself, see appliance.runtime.batcher)."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from dataclasses import dataclass


@dataclass
class Lifecycle:
    draining: bool = False
    connections: Collection[object] | None = None
    """uvicorn's open connections (set by appliance.server; None when something else serves
    the app)."""
    requests: Collection[object] | None = None
    """uvicorn's tasks, one per request whose headers it has read, until answered."""

    def alone(self) -> bool:
        """One client, waiting for the one request in progress, and the caller is that
        request's own task: nothing else can arrive but a new connection, and no sibling
        call of the same request (a pipeline's steps run at once as tasks of their own)
        would wait behind this one. Open connections, not requests alone: with two clients,
        the second one's request, sent while the loop runs the first one's model call, is
        read after it and would look alone too, and every call would run on the loop, one
        at a time. (A count of requests in a middleware would be worse still: requests read
        in one loop turn start one after another.) False when not known."""
        return (
            self.connections is not None
            and self.requests is not None
            and len(self.connections) <= 1
            and len(self.requests) <= 1
            and asyncio.current_task() in self.requests
        )
