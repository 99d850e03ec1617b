"""Which shared backends answered their last call, for /readyz and /metrics.

Every cluster call reports here instead of logging on its own: a backend going down is logged
once (and once again when it is back), not once per request."""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger("appliance.cluster")


class BackendHealth:
    def __init__(self, metrics: Any = None) -> None:
        self._metrics = metrics
        self._up: dict[str, bool] = {}
        self._lock = threading.Lock()
        self.fail_open = 0
        """Requests admitted without a limit decision (on_redis_down = "fail_open")."""

    def watch(self, backend: str) -> None:
        self.ok(backend)

    def ok(self, backend: str) -> None:
        if self._up.get(backend) is True:
            return
        with self._lock:
            was = self._up.get(backend)
            self._up[backend] = True
        if was is False:
            log.warning("%s is reachable again", backend)
        if self._metrics is not None:
            self._metrics.backend_up.labels(backend).set(1)

    def failed(self, backend: str, exc: BaseException) -> None:
        with self._lock:
            was = self._up.get(backend)
            self._up[backend] = False
        if was is not False:
            log.error("%s is unreachable: %s", backend, exc)
        if self._metrics is not None:
            self._metrics.backend_up.labels(backend).set(0)
            self._metrics.backend_errors.labels(backend).inc()

    def admitted_open(self) -> None:
        self.fail_open += 1
        if self._metrics is not None:
            self._metrics.fail_open.inc()

    def states(self) -> dict[str, str]:
        return {name: "up" if up else "down" for name, up in sorted(self._up.items())}
