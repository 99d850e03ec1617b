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
    """The client and the health record every Redis store shares."""

    def __init__(self, url: str, health: BackendHealth) -> None:
        self.url = url
        self.client = connect(url)
        self.health = health
        health.watch(BACKEND)

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
