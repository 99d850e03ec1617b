"""What `serve --workers 2` gives over one process on this machine: the same model and load
against `appliance serve` with server.workers = 1 and = 2 (its cross-process limits and
spend, SQLite in data_dir), with wrk:

- misses: one short text (~10 tokens) per request, a different one each time, c=32: the
  model, tokenizer and HTTP path;
- hits: one fixed text, c=8: after the first request every answer is a cache hit, so the
  model never runs and the figure is the Python request path (auth, limits, cache, usage).

Both servers are up together and loaded in alternating rounds (the medians count), so a
machine whose speed drifts moves both alike.

    python -m benchmarks.workers quantized_models --seconds 6 --rounds 3

Prints the figures, the command and one `BENCH_JSON {...}` line."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.loadgen import Target, ensure_wrk, run_load
from benchmarks.procs import Monitor, Server, free_port, one_model_dir
from benchmarks.texts import Shape, short_single

ROOT = Path(__file__).resolve().parent.parent
LIMITS = "[limits]\nrequests_per_minute = 100000000\ntokens_per_minute = 100000000000\n"
LOADS = {"misses": 32, "hits": 8}  # load -> concurrency
HIT_SHAPE = Shape("one-fixed-text", "short", 1, 1, 1)


def _server(workers: int, run: Path, models_dir: Path) -> tuple[Server, str, str]:
    name = f"workers{workers}"
    config = run / f"{name}.toml"
    config.write_text(
        f'data_dir = "{run / name}"\nmodels_dir = "{models_dir}"\n'
        f'[server]\nworkers = {workers}\nlog_level = "warning"\n{LIMITS}'
    )
    cli = [sys.executable, "-m", "appliance.cli"]
    made = subprocess.run(
        [*cli, "keys", "create", "--name", "bench", "--scopes", "admin", "--config", str(config)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    port = free_port()
    server = Server(
        name,
        [*cli, "serve", "--config", str(config), "--port", str(port)],
        ready_url=f"http://127.0.0.1:{port}/readyz",
        log=run / f"{name}.log",
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT)},
    )
    return server, f"http://127.0.0.1:{port}", made.stdout.strip().splitlines()[-1]


def measure(models_dir: Path, model: str, seconds: float, rounds: int) -> dict[str, Any]:
    from appliance.runtime.session import usable_cores

    wrk = ensure_wrk()
    tool = "wrk" if wrk else "httpx"
    short, words = short_single(models_dir, model)
    shapes = {"misses": (short, words), "hits": (HIT_SHAPE, ["hello"])}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        f"workers{w}": {load: [] for load in LOADS} for w in (1, 2)
    }
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        run = Path(tmp)
        servers: dict[str, tuple[Server, Monitor, Target]] = {}
        try:
            served = one_model_dir(models_dir, model, run)
            for workers in (1, 2):
                server, base, key = _server(workers, run, served)
                server.start()
                assert server.proc is not None
                target = Target(f"{base}/v1/text-vectorisation", "text", model, {"x-api-key": key})
                servers[server.name] = (server, Monitor(server.proc.pid), target)
                run_load(tool, target, short, words, concurrency=8, duration=2, wrk_path=wrk)
            for _ in range(rounds):
                for load, concurrency in LOADS.items():
                    shape, load_words = shapes[load]
                    for name, (_srv, monitor, target) in servers.items():
                        monitor.wait_idle()
                        cpu0 = monitor.cpu_seconds()
                        res = run_load(
                            tool, target, shape, load_words,
                            concurrency=concurrency, duration=seconds, wrk_path=wrk,
                        )  # fmt: skip
                        took = res["duration_s"] or seconds
                        ok = res["requests"] - res["errors_status"]
                        runs[name][load].append(
                            {
                                "requests_per_s": round(ok / took, 1),
                                "p50_ms": round(res["p50_ms"], 2),
                                "p99_ms": round(res["p99_ms"], 2),
                                "errors": res["errors_status"],
                                "server_cpu_cores": round((monitor.cpu_seconds() - cpu0) / took, 2),
                            }
                        )
        finally:
            for server, monitor, _target in servers.values():
                monitor.close()
                server.stop()
    medians = {
        name: {
            load: {
                field: statistics.median(p[field] for p in points)
                for field in ("requests_per_s", "p50_ms", "p99_ms", "server_cpu_cores")
            }
            for load, points in by_load.items()
        }
        for name, by_load in runs.items()
    }
    return {
        "cores": usable_cores(),
        "cpu_count": os.cpu_count(),
        "model": model,
        "loadgen": tool,
        "seconds_per_run": seconds,
        "rounds": rounds,
        "concurrency": LOADS,
        "medians": medians,
        "workers2_vs_1": {
            load: round(
                medians["workers2"][load]["requests_per_s"]
                / medians["workers1"][load]["requests_per_s"],
                3,
            )
            for load in LOADS
        },
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.workers", description=__doc__)
    parser.add_argument("models_dir", type=Path)
    parser.add_argument("--model", default="all-minilm-l6-v2")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    out = measure(args.models_dir.resolve(), args.model, args.seconds, args.rounds)
    print(
        f"{out['model']}, {out['cores']} usable cores, {out['loadgen']}, "
        f"{args.rounds} rounds of {args.seconds:g} s per point (medians):"
    )
    for load, concurrency in LOADS.items():
        for name in ("workers1", "workers2"):
            m = out["medians"][name][load]
            print(
                f"  {load:6} c={concurrency:<3} {name}: {m['requests_per_s']:8.1f} req/s  "
                f"p50 {m['p50_ms']:6.2f} ms  p99 {m['p99_ms']:6.2f} ms  "
                f"server CPU {m['server_cpu_cores']:.2f} cores"
            )
        print(f"  {load:6} workers=2 / workers=1: {out['workers2_vs_1'][load]:.3f}")
    print("command: python -m benchmarks.workers " + " ".join(sys.argv[1:]))
    print("BENCH_JSON " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
