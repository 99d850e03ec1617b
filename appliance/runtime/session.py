"""onnxruntime sessions tuned for serving, with providers taken from config, in order, falling
back with a warning.

Serving settings (measured with `appliance bench`, see README "Performance"):
- streams: an encoder model runs as many calls at once as there are cores this process may
  really use (CPU affinity and a cgroup CPU quota, not the host's core count), each with one
  onnxruntime thread. On the 2-core test machine (all-MiniLM-L6-v2 INT8, 10-token texts)
  one call at a time on 2 threads reached 1,470-1,740 texts/s at its best batch, two calls
  at once on one thread each 2,400-2,500: the small operators of a small encoder leave a
  second intra-op thread mostly waiting, two whole calls keep both cores busy. 128-token
  texts: 113 vs 190 texts/s. Per-token decoders keep one call with every core, since their
  calls are latency-bound and the runner holds per-call state;
  `runtime.streams` / `runtime.intra_op_threads` override both;
- worker threads do not spin while waiting for work: the event loop, the tokenizer and the
  response encoding share those cores with the model call, and a spinning pool takes their
  time between batches (and burns a core on an idle server);
- a lone request's call (the server answers nothing else; appliance.runtime.batcher) has the
  cores to itself: a text encoder gets a second session for it, with every core and a pool
  that spins while the call runs and stops when it returns. Without spinning a second
  thread gained nothing (a futex wake-up per operator); with it one short text took
  1.2 vs 2.0 ms (all-MiniLM-L6-v2, in-process), c=1 over HTTP p50 2.68-3.38 -> 1.83-2.68 ms.
  It costs that session's copy of the weights (+27-38 MB RSS for all-MiniLM-L6-v2), so it
  is opened only for embedding and classification models whose warm-up call shows a short
  text fits the inline path, and only in a serving process; `runtime.lone_call_threads = 1`
  goes without;
- no CPU memory arena for models called once per request batch: with the arena a session
  keeps the memory of its largest batch for life (about +170 MB for all-MiniLM-L6-v2 after
  one 32 x 128-token batch); without it the memory goes back after each call, at no
  measurable cost in speed. Per-token decoders keep it (see ARENA_TASKS).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import onnxruntime as ort

from appliance.config import RuntimeConfig

log = logging.getLogger("appliance.runtime")


def choose_providers(requested: list[str]) -> list[str]:
    available = set(ort.get_available_providers())
    chosen = [p for p in requested if p in available]
    missing = [p for p in requested if p not in available]
    if missing:
        log.warning("execution providers not available here, skipped: %s", ", ".join(missing))
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def usable_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process can run on: its CPU affinity, capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


# Per-token decoders call the model once per generated token with buffers of the same sizes:
# there the arena's reuse is what it is for (not measured by `appliance bench`), so it stays.
ARENA_TASKS = frozenset({"text-generation", "summarisation"})


def worker_cores(workers: int = 1) -> int:
    """This process's share of the usable cores when `workers` processes serve together
    (server.workers): each opens its own sessions, so each sizes them to cores // workers."""
    return max(1, usable_cores() // max(1, workers))


def plan_streams(config: RuntimeConfig, task: str, workers: int = 1) -> tuple[int, int]:
    """(calls at once, onnxruntime intra-op threads per call) for a model of `task`, in one
    of `workers` serving processes."""
    cores = worker_cores(workers)
    streams = config.streams or (1 if task in ARENA_TASKS else cores)
    threads = config.intra_op_threads or max(1, cores // streams)
    return streams, threads


LONE_CALL_TASKS = frozenset({"feature-extraction", "text-classification"})
"""Tasks whose request is mostly one short text, small enough for a lone call on the event
loop (appliance.runtime.batcher.INLINE_TOKENS). Question answering (question + context),
rerank (query x texts) and zero-shot (text x labels) rarely are: a second session would hold
a copy of their weights for nothing."""


def lone_call_threads(config: RuntimeConfig, task: str, workers: int = 1) -> int:
    """Intra-op threads of a lone request's call, in a session of its own (see above);
    0: no such session (the task's requests are rarely that small, or the streams' own calls
    have as many threads). At most this process's share of the cores."""
    if task not in LONE_CALL_TASKS:
        return 0
    cores = worker_cores(workers)
    threads = min(config.lone_call_threads or cores, cores)
    return threads if threads > plan_streams(config, task, workers)[1] else 0


def session_options(
    config: RuntimeConfig, *, arena: bool = False, threads: int | None = None, spin: bool = False
) -> ort.SessionOptions:
    """`spin`: the intra-op pool spins while a call runs and stops as it returns (lone calls)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or config.intra_op_threads or usable_cores()
    options.inter_op_num_threads = config.inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = arena
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if spin:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


def create_session(
    path: Path,
    config: RuntimeConfig,
    *,
    arena: bool = False,
    threads: int | None = None,
    spin: bool = False,
    providers: list[str] | None = None,
) -> ort.InferenceSession:
    """A session for `path`; `arena`: keep the CPU memory arena (per-token decoders);
    `threads`: intra-op threads (default: config, else every usable core); `spin`: see
    session_options; `providers`: what another session of the model already runs on (its
    `get_providers()`), so the choice and its warnings are made once per model."""
    providers = providers or choose_providers(config.providers)
    options = session_options(config, arena=arena, threads=threads, spin=spin)
    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    # onnxruntime-gpu lists CUDA even without a GPU and silently runs on CPU: check what it chose.
    actual = session.get_providers()
    if providers[0] not in actual:
        log.warning(
            "%s: asked for %s, running on %s", path.parent.name, providers[0], ", ".join(actual)
        )
    return session
