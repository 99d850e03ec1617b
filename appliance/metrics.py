"""Prometheus metrics (prometheus-client), one registry per app, names prefixed `appliance_`.

Request count and duration by endpoint/model/status, queue and inference time and batch size
per model, queue depth and load status per model (read at scrape time), cache hits and
misses, tokens, rate-limited requests.

With server.workers > 1 the supervisor sets PROMETHEUS_MULTIPROC_DIR before the workers
start: prometheus_client then keeps every counter and histogram in files there, and
/metrics on any worker sums all workers' (the model and queue gauges read at scrape time
are the answering worker's own).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from appliance.models.registry import ModelEntry

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
CONTENT_TYPE = "text/plain; version=0.0.4"
"""litestar adds the `charset=utf-8` of a text type itself (given here too, it was sent twice)."""


class _ModelState(Collector):
    def __init__(self, entries: Callable[[], Iterable[ModelEntry]]) -> None:
        self.entries = entries

    def collect(self) -> Iterable[Metric]:
        loaded = GaugeMetricFamily(
            "appliance_model_loaded",
            "1 if the model loaded and serves, 0 if it failed",
            labels=["model", "task"],
        )
        depth = GaugeMetricFamily(
            "appliance_queue_depth", "Items waiting for the model", labels=["model"]
        )
        for e in self.entries():
            task = e.manifest.task if e.manifest else ""
            loaded.add_metric([e.slug, task], 1.0 if e.is_active else 0.0)
            if e.batcher is not None:
                depth.add_metric([e.slug], float(e.batcher.depth))
        yield loaded
        yield depth


class _Dropped(Collector):
    def __init__(self, dropped: Callable[[], int]) -> None:
        self.dropped = dropped

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "appliance_usage_records_dropped",
            "Usage records dropped because the usage queue was full (the disk lagged)",
        )
        family.add_metric([], float(self.dropped()))
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self._local: list[Collector] = []  # read at scrape time, from this process only
        r = self.registry
        self.requests = Counter(
            "appliance_requests", "HTTP requests", ["endpoint", "model", "status"], registry=r
        )
        self.request_duration = Histogram(
            "appliance_request_duration_seconds",
            "End-to-end request time",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "appliance_queue_time_seconds",
            "Time items wait in the batcher",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_time = Histogram(
            "appliance_inference_time_seconds",
            "Time of one model call (a batch)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "appliance_batch_size",
            "Items per model call",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.cache_hits = Counter(
            "appliance_cache_hits", "Responses served from the cache", registry=r
        )
        self.cache_misses = Counter("appliance_cache_misses", "Responses computed", registry=r)
        self.tokens = Counter("appliance_tokens", "Tokenizer tokens charged", ["model"], registry=r)
        self.rate_limited = Counter(
            "appliance_rate_limited_requests", "Requests refused with 429", registry=r
        )
        # Cluster mode: one series per shared backend ("redis", "postgres") once it is in use.
        self.backend_up = Gauge(
            "appliance_backend_up",
            "1 if the backend answered its last call",
            ["backend"],
            registry=r,
        )
        self.backend_errors = Counter(
            "appliance_backend_errors", "Failed calls to a shared backend", ["backend"], registry=r
        )
        self.fail_open = Counter(
            "appliance_backend_fail_open",
            "Requests admitted without a limit or quota decision (Redis down, fail_open)",
            registry=r,
        )

    def watch_models(self, entries: Callable[[], Iterable[ModelEntry]]) -> None:
        self._watch(_ModelState(entries))

    def watch_usage(self, dropped: Callable[[], int]) -> None:
        """Usage records dropped because the usage queue was full (read at scrape time)."""
        self._watch(_Dropped(dropped))

    def _watch(self, collector: Collector) -> None:
        self.registry.register(collector)
        self._local.append(collector)

    def batch_observer(self, model: str) -> Callable[[int, list[float], float], None]:
        queue, infer, size = (
            self.queue_time.labels(model),
            self.inference_time.labels(model),
            self.batch_size.labels(model),
        )

        def observe(items: int, waits: list[float], seconds: float) -> None:
            size.observe(items)
            infer.observe(seconds)
            for wait in waits:
                queue.observe(wait)

        return observe

    def render(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        # The counters of every worker (files in the shared folder), plus this one's
        # scrape-time gauges; a registry per scrape, as prometheus_client's docs advise.
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        for collector in self._local:
            registry.register(collector)
        return generate_latest(registry)
