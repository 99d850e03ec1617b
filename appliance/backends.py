"""The state backends, chosen once at start: the single box's files (keys.json, SQLite,
diskcache, memory) or, when [cluster] is configured, PostgreSQL and Redis shared by every
replica. Routes, the inference path and the job runner only see the interfaces (KeyStore,
RateLimiter, UsageLog, ClassifierStore, the cache's second level, events, job leases), so
none of them knows which is in use."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from appliance.classifiers import ClassifierStore
from appliance.config import Settings
from appliance.gateway.keys import KeyStore
from appliance.gateway.ratelimit import RateLimiter
from appliance.gateway.usage import UsageLog
from appliance.pipelines import LocalPipelineStore, PipelineStore


class LocalEvents:
    """A single box has nobody to tell."""

    def on(self, kind: str, handler: Any) -> None:
        pass

    def publish(self, kind: str, **fields: str) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


@dataclass
class Backends:
    keys: KeyStore
    limiter: RateLimiter
    usage: UsageLog
    classifiers: ClassifierStore
    pipelines: PipelineStore
    events: Any = field(default_factory=LocalEvents)
    shared_cache: Any = None
    leases: Any = None
    """Job and build leases (cluster mode); None: this process owns every job."""
    health: Any = None
    """Which shared backends answer (cluster mode), for /readyz."""
    closers: list[Any] = field(default_factory=list)
    cluster: bool = False
    secrets: Any = None
    """Cluster mode: secrets every replica must share (appliance.cluster.secrets)."""
    grants: Any = None
    """Cluster mode: upload-URL grants any replica can redeem; None: in this process."""
    workers: int = 1
    """server.workers: above 1, every one of these is safe across the worker processes."""

    def shared_secret(self, name: str) -> Callable[[], bytes] | None:
        """A loader of the secret `name` that every replica shares (None on a single box,
        where each feature keeps its own file in data_dir)."""
        if self.secrets is None:
            return None
        return lambda: self.secrets.get(name)

    def start(self) -> None:
        """Blocking (run in a thread): connections, migrations, first loads."""
        starter = getattr(self.keys, "start", None)
        if starter is not None:
            starter()
        self.events.start()

    def stop(self) -> None:
        self.events.stop()
        stopper = getattr(self.keys, "stop", None)
        if stopper is not None:
            stopper()
        for close in self.closers:
            close()


def open_backends(settings: Settings, metrics: Any = None) -> Backends:
    usage = settings.usage
    if not settings.cluster.enabled and settings.server.workers > 1:
        # Several processes on one box: the same files, reached in ways that stay exact
        # across processes. One process keeps the in-memory fast paths below.
        from appliance.workers.shared import open_worker_backends

        return open_worker_backends(settings)
    if not settings.cluster.enabled:
        return Backends(
            keys=KeyStore(settings.keys_path),
            limiter=RateLimiter(),
            usage=UsageLog(settings.usage_path, retention_days=usage.retention_days),
            classifiers=ClassifierStore(
                settings.data_path / "classifiers.json",
                max_per_key=settings.classifiers.max_per_key,
            ),
            pipelines=LocalPipelineStore(
                settings.data_path / "pipelines.json", max_per_key=settings.pipelines.max_per_key
            ),
        )
    from appliance.cluster.setup import open_cluster  # only now: Redis and psycopg imports

    backends = open_cluster(settings, metrics)
    backends.workers = settings.server.workers  # already shared: each worker opens its own
    return backends


@contextlib.contextmanager
def key_store(settings: Settings) -> Iterator[KeyStore]:
    """The keys as `appliance keys ...` sees them: the keys file, or PostgreSQL in cluster
    mode (changes are announced on Redis when it is configured, so running replicas apply
    them at once; otherwise within their refresh interval)."""
    if not settings.cluster.database_url:
        yield KeyStore(settings.keys_path)
        return
    from appliance.cluster.events import Events
    from appliance.cluster.health import BackendHealth
    from appliance.cluster.keys import PgKeyStore
    from appliance.cluster.redis_client import RedisBackend
    from appliance.cluster.setup import open_database

    health = BackendHealth()
    db = open_database(settings, health)
    redis = RedisBackend(settings.cluster.redis_url, health) if settings.cluster.redis_url else None
    events = Events(redis, settings.cluster.replica_id + "-cli") if redis else None
    try:
        yield PgKeyStore(db, events)
    finally:
        db.close()
        if redis is not None:
            redis.close()
