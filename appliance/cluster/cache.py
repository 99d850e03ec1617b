"""The second level of the response cache, in Redis: an answer computed on one replica is a
hit on every other. Entries are the same msgpack blobs as the disk cache's, under the same
keys (model files' hash included), with the same TTL. Any Redis failure is a miss: the
disk cache (first level) keeps working alone."""

from __future__ import annotations

import contextlib

import redis

from appliance.cluster.redis_client import RedisBackend

PREFIX = "apl:cache:"


class RedisSharedCache:
    def __init__(self, backend: RedisBackend) -> None:
        self.backend = backend

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        try:
            values = self.backend.call(self.backend.client.mget, [PREFIX + k for k in keys])
        except redis.RedisError:
            return {}
        return {k: v for k, v in zip(keys, values, strict=True) if v is not None}

    @staticmethod
    def names(keys: list[str]) -> list[str]:
        """The Redis keys of cache keys (for a read batched into another call)."""
        return [PREFIX + k for k in keys]

    def set_many(self, blobs: dict[str, bytes], ttl: float) -> None:
        pipe = self.backend.client.pipeline(transaction=False)
        for key, blob in blobs.items():
            pipe.set(PREFIX + key, blob, ex=max(1, int(ttl)))
        # Unreachable, or refusing writes (out of memory, a read-only replica after a
        # failover): then uncached on the other replicas only.
        with contextlib.suppress(redis.RedisError):
            self.backend.call(pipe.execute)
