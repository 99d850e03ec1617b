"""One Redis client per process, with short timeouts: Redis down must cost a request
milliseconds (then on_redis_down decides), never hang it."""

from __future__ import annotations

from typing import Any, TypeVar

import redis

from appliance.cluster.health import BackendHealth

BACKEND = "redis"
ERRORS = (redis.ConnectionError, redis.TimeoutError)
T = TypeVar("T")


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        health_check_interval=0,
        retry_on_timeout=False,
        decode_responses=False,
    )


class RedisBackend:
    """The clients and the health record every Redis store shares: a blocking client for
    worker threads (cache writer, events, quota counters) and an asyncio one for the request
    path, so that a round trip never holds the event loop."""

    def __init__(self, url: str, health: BackendHealth) -> None:
        self.url = url
        self.client = connect(url)
        self._aclient: Any = None
        self.health = health
        health.watch(BACKEND)

    @property
    def aclient(self) -> Any:
        """Made at first use, inside the server's event loop (it binds to it)."""
        if self._aclient is None:
            import redis.asyncio

            self._aclient = redis.asyncio.Redis.from_url(
                self.url,
                socket_timeout=0.5,
                socket_connect_timeout=0.5,
                retry_on_timeout=False,
                decode_responses=False,
                max_connections=64,
            )
        return self._aclient

    async def acall(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            result = await fn(*args, **kwargs)
        except ERRORS as exc:
            self.health.failed(BACKEND, exc)
            raise
        self.health.ok(BACKEND)
        return result

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """fn(*args) with the outcome recorded; Redis errors propagate as redis errors."""
        try:
            result = fn(*args, **kwargs)
        except ERRORS as exc:
            self.health.failed(BACKEND, exc)
            raise
        self.health.ok(BACKEND)
        return result

    def ping(self) -> bool:
        try:
            self.call(self.client.ping)
        except ERRORS:
            return False
        return True

    def close(self) -> None:
        self.client.close()
