"""The raw engine ceiling: the INT8 ONNX session called in-process, no HTTP, no queue, with
ideal batches (pre-tokenised, sorted by length so padding is minimal; batch 1, 8 and 32), in
both ways of using the cores: one call at a time with one onnxruntime thread per core, and
one call per core at once with one thread each (the appliance's default for encoders). The
best of all is the ceiling: what any server around this session can reach, at most.
Also the runner's own model call (`EmbeddingRunner.infer`: pad, run, pool) on merged
batches, with and without run_session's length buckets and per-call token budget.

Run in its own process by the harness: python -m benchmarks.engine MODEL_DIR --spec SPEC.json"""

from __future__ import annotations

import argparse
import json
import random
import resource
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

BUCKETS = (256, 1024)
"""run_session's PAD_WASTE_TOKENS and CALL_TOKENS for the "buckets" runner measurement."""


def _timed(call, seconds: float, min_calls: int = 3) -> tuple[int, float]:  # type: ignore[no-untyped-def]
    call()  # warm
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < seconds:
        call()
        calls += 1
    return calls, time.perf_counter() - start


def _timed_parallel(calls: list, seconds: float) -> tuple[int, float]:  # type: ignore[type-arg]
    """`calls[i]` run over and over on thread i, all at once, for `seconds`: (calls, seconds)."""
    for call in calls:
        call()  # warm
    counts = [0] * len(calls)
    start = time.perf_counter()
    stop = start + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < stop or counts[i] < 2:
            calls[i]()
            counts[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts), time.perf_counter() - start


def measure(
    model_dir: Path, shapes: list[dict[str, Any]], words: list[str], seconds: float
) -> dict[str, Any]:
    from appliance.config import RuntimeConfig
    from appliance.models.manifest import read_manifest
    from appliance.runtime.session import create_session, usable_cores
    from appliance.tasks import build_runner
    from benchmarks.texts import make_text

    manifest = read_manifest(model_dir)
    t0 = time.perf_counter()
    session = create_session(model_dir / manifest.files["model"].path, RuntimeConfig())
    load_s = time.perf_counter() - t0
    runner: Any = build_runner(model_dir, manifest, session)
    cores = usable_cores()
    # One call per core at once, one thread each: onnxruntime sessions take concurrent runs.
    single = create_session(model_dir / manifest.files["model"].path, RuntimeConfig(), threads=1)
    tok = runner.tokenizer
    names = {i.name for i in session.get_inputs()}
    rng = random.Random(5)
    out: dict[str, Any] = {"session_load_s": round(load_s, 3), "points": []}
    for shape in shapes:
        if shape["per_request"] == 1:
            continue  # one entry per text length: batch 1 and batch N measured below
        texts = [make_text(rng, words, shape["min_words"], shape["max_words"]) for _ in range(512)]
        enc = sorted(tok.encode(texts), key=lambda e: e.n_tokens)
        tokens = sum(e.n_tokens for e in enc) / len(enc)
        for batch in sorted({1, 8, shape["per_request"]}):
            feeds = [
                {k: v for k, v in tok.pad(enc[i : i + batch]).items() if k in names}
                for i in range(0, len(enc) - batch + 1, batch)
            ]
            it = iter(range(1 << 62))

            def call(feeds=feeds, it=it, session=session) -> None:  # type: ignore[no-untyped-def]
                session.run(None, feeds[next(it) % len(feeds)])

            def one_of(k: int, feeds=feeds) -> Any:  # type: ignore[no-untyped-def]
                mine = iter(range(k, 1 << 62, cores))
                return lambda: single.run(None, feeds[next(mine) % len(feeds)])

            runs = {  # way: (calls, seconds, calls at once)
                f"1 call x {cores} threads": (*_timed(call, seconds), 1),
                f"{cores} calls x 1 thread": (
                    *_timed_parallel([one_of(k) for k in range(cores)], seconds),
                    cores,
                ),
            }
            for way, (calls, took, at_once) in runs.items():
                out["points"].append(
                    {
                        "length": shape["length"],
                        "batch": batch,
                        "way": way,
                        "tokens_per_text": round(tokens, 1),
                        "texts_per_s": round(calls * batch / took, 1),
                        "ms_per_call": round(took / calls * at_once * 1e3, 3),
                    }
                )
    # The runner's own model call (pad, run, pool) on merged batches of 32 as the micro-batcher
    # hands them over, unsorted: with run_session's length buckets and call budget, and with
    # them turned off (one call per batch, as before), alternately, in this same process.
    workloads = {
        "short": [make_text(rng, words, 7, 9) for _ in range(32 * 8)],
        "medium": [make_text(rng, words, 105, 147) for _ in range(32 * 4)],
        "mixed": [make_text(rng, words, 4, 110) for _ in range(32 * 8)],
    }
    cls = type(runner)
    default = (cls.PAD_WASTE_TOKENS, cls.CALL_TOKENS)
    tuned, off = BUCKETS, (None, None)
    out["runner"] = []
    for name, texts in workloads.items():
        items = runner.preprocess(texts)
        batches = [items[i : i + 32] for i in range(0, len(items), 32)]
        row: dict[str, Any] = {
            "texts": name,
            "batch": 32,
            "tokens_per_text": round(float(np.mean([runner.cost(i) for i in items])), 1),
        }
        speeds: dict[str, list[float]] = {"one_call": [], "buckets": []}
        for _ in range(2):
            for mode, values in speeds.items():
                cls.PAD_WASTE_TOKENS, cls.CALL_TOKENS = tuned if mode == "buckets" else off
                it2 = iter(range(1 << 62))
                calls, took = _timed(
                    lambda b=batches, i=it2: runner.infer(b[next(i) % len(b)]), seconds / 2, 2
                )
                values.append(calls * 32 / took)
        cls.PAD_WASTE_TOKENS, cls.CALL_TOKENS = default
        for mode, values in speeds.items():
            row[f"{mode}_texts_per_s"] = round(max(values), 1)
        row["gain"] = round(row["buckets_texts_per_s"] / row["one_call_texts_per_s"], 2)
        out["runner"].append(row)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--spec", type=Path, required=True, help="JSON: shapes and words")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    spec = json.loads(args.spec.read_text())
    result = measure(args.model_dir, spec["shapes"], spec["words"], args.seconds)
    print("BENCH_JSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
