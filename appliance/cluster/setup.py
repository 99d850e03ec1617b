"""Cluster backends from [cluster]: PostgreSQL for what must last, Redis for what must be
fast and shared. Both are needed for the full set; see README "Running several replicas"."""

from __future__ import annotations

from typing import Any

from appliance.backends import Backends
from appliance.cluster.cache import RedisSharedCache
from appliance.cluster.classifiers import PgClassifierStore, PgPipelineStore
from appliance.cluster.database import Database
from appliance.cluster.events import Events
from appliance.cluster.grants import PgGrants
from appliance.cluster.health import BackendHealth
from appliance.cluster.keys import PgKeyStore
from appliance.cluster.leases import Leases
from appliance.cluster.limits import RedisLimiter, RedisSpend
from appliance.cluster.redis_client import RedisBackend
from appliance.cluster.secrets import SharedSecrets
from appliance.cluster.usage import ClusterUsageLog
from appliance.config import ConfigError, Settings


def open_database(settings: Settings, health: BackendHealth | None = None) -> Database:
    db = Database(settings.cluster.database_url, health or BackendHealth())
    db.open()
    return db


def open_cluster(settings: Settings, metrics: Any = None) -> Backends:
    cluster = settings.cluster
    if not cluster.database_url or not cluster.redis_url:
        raise ConfigError(
            "cluster mode needs both cluster.database_url (PostgreSQL) and cluster.redis_url "
            "(Redis); set both, or neither for a single box"
        )
    health = BackendHealth(metrics)
    fail_open = cluster.on_redis_down == "fail_open"
    db = open_database(settings, health)
    redis = RedisBackend(cluster.redis_url, health)
    redis.ping()  # records its state; a Redis down at start is on_redis_down's to handle
    events = Events(redis, cluster.replica_id)
    usage = ClusterUsageLog(
        db,
        None,
        replica=cluster.replica_id,
        retention_days=settings.usage.retention_days,
    )
    usage.spend_counter = RedisSpend(redis, usage.durable_spent, fail_open=fail_open)
    return Backends(
        keys=PgKeyStore(db, events),
        limiter=RedisLimiter(redis, fail_open=fail_open),  # type: ignore[arg-type]
        usage=usage,  # type: ignore[arg-type]
        classifiers=PgClassifierStore(db, events, max_per_key=settings.classifiers.max_per_key),
        pipelines=PgPipelineStore(db, events, max_per_key=settings.pipelines.max_per_key),
        events=events,
        shared_cache=RedisSharedCache(redis),
        leases=Leases(db, cluster.replica_id),
        health=health,
        closers=[db.close, redis.close],
        cluster=True,
        secrets=SharedSecrets(db),
        grants=PgGrants(db),
    )
