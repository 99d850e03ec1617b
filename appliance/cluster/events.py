"""One Redis pub/sub channel that tells every replica what changed elsewhere: a key revoked
or its limits changed, a model added, replaced or removed, a classifier saved or deleted.

A listener thread calls the handlers registered for a kind. Missed messages (Redis down, a
reconnect) are covered by calling every handler after each (re)subscription, and by the
stores' own periodic refresh."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable

from appliance.cluster.redis_client import ERRORS, RedisBackend

log = logging.getLogger("appliance.cluster")

CHANNEL = "appliance:events"


class Events:
    def __init__(self, backend: RedisBackend, replica: str) -> None:
        self.backend = backend
        self.replica = replica
        self._handlers: dict[str, list[Callable[[dict[str, str]], None]]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.received = 0

    def on(self, kind: str, handler: Callable[[dict[str, str]], None]) -> None:
        self._handlers.setdefault(kind, []).append(handler)

    def publish(self, kind: str, **fields: str) -> None:
        """Tell the other replicas; a failure is logged (their periodic refresh catches up)."""
        message = json.dumps({"kind": kind, "replica": self.replica, **fields})
        try:
            self.backend.call(self.backend.client.publish, CHANNEL, message)
        except ERRORS as exc:
            log.warning("event %s not published (%s); replicas catch up on refresh", kind, exc)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._listen, name="cluster-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=3)

    def _dispatch(self, kind: str, message: dict[str, str]) -> None:
        for handler in self._handlers.get(kind, ()):
            try:
                handler(message)
            except Exception:
                log.exception("event handler for %s failed", kind)

    def _listen(self) -> None:
        while not self._stop.is_set():
            pubsub = self.backend.client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(CHANNEL)
                self.backend.health.ok("redis")
                for kind in list(self._handlers):  # whatever was missed while unsubscribed
                    self._dispatch(kind, {"kind": kind, "replica": ""})
                while not self._stop.is_set():
                    raw = pubsub.get_message(timeout=0.5)
                    if raw is None or raw.get("type") != "message":
                        continue
                    try:
                        message = json.loads(raw["data"])
                    except (ValueError, TypeError):
                        continue
                    if message.get("replica") == self.replica:
                        continue  # our own change: already applied here
                    self.received += 1
                    self._dispatch(str(message.get("kind")), message)
            except ERRORS as exc:
                self.backend.health.failed("redis", exc)
                time.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()
