"""The overview's figures, read from the server's own Prometheus registry and usage log:
nothing here counts requests a second time."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Any

from appliance.gateway.usage import UsageLog
from appliance.metrics import Metrics

RATE_CAP = 10_000


def _samples(metrics: Metrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in metrics.registry.collect():
        for sample in family.samples:
            found[sample.name].append((sample.labels, sample.value))
    return found


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The q-quantile of a cumulative histogram [(upper bound, count)], interpolated
    linearly inside its bucket as Prometheus' histogram_quantile does."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower  # beyond the last finite bucket: its bound is all we know
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 0.0)
        lower, below = bound, count
    return lower


def overview(metrics: Metrics, usage: UsageLog, now: float | None = None) -> dict[str, Any]:
    samples = _samples(metrics)
    total = sum(v for _, v in samples.get("appliance_requests_total", []))
    hits = sum(v for _, v in samples.get("appliance_cache_hits_total", []))
    misses = sum(v for _, v in samples.get("appliance_cache_misses_total", []))
    by_bound: dict[float, float] = defaultdict(float)
    for labels, value in samples.get("appliance_request_duration_seconds_bucket", []):
        by_bound[float(labels["le"])] += value
    buckets = list(by_bound.items())
    depth = {labels["model"]: value for labels, value in samples.get("appliance_queue_depth", [])}
    now = now or time.time()
    # Counted from the usage log (the metrics hold totals since start, not a window); capped so
    # that a poll under heavy load stays a small read.
    last_minute = usage.logs(
        key_id=None,
        status=None,
        model=None,
        since=now - 60,
        until=None,
        limit=RATE_CAP + 1,
        offset=0,
    )
    p50, p99 = quantile(buckets, 0.5), quantile(buckets, 0.99)
    return {
        "requests_total": int(total),
        "requests_per_minute": min(len(last_minute), RATE_CAP),
        "requests_per_minute_capped": len(last_minute) > RATE_CAP,
        "cache_hit_rate": hits / (hits + misses) if hits + misses else None,
        "cache_hits": int(hits),
        "cache_misses": int(misses),
        "p50_ms": None if p50 is None else p50 * 1000,
        "p99_ms": None if p99 is None else p99 * 1000,
        "queue_depth": int(sum(depth.values())),
        "queue_by_model": {m: int(v) for m, v in depth.items()},
    }
