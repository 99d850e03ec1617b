"""`appliance batch run` throughput: lines/s of the in-process runner and of Ray Data (a local
Ray with this machine's CPUs, one actor per CPU) on the same file, in one process.

    python -m benchmarks.batch_run MODELS_DIR --model all-minilm-l6-v2 --lines 20000

Prints one `BENCH_JSON {...}` line (see benchmarks/run.py)."""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from appliance.config import load_settings
from appliance.jobs.offline import RunSpec, run_in_process, run_on_ray

ENDPOINT = "/v1/text-vectorisation"
WORDS = [
    "invoice",
    "refund",
    "crash",
    "login",
    "billing",
    "great",
    "slow",
    "broken",
    "account",
    "password",
    "update",
]


def write_lines(path: Path, count: int, model: str) -> None:
    rng = random.Random(1)
    with open(path, "w") as fh:
        for i in range(count):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16)))
            fh.write(json.dumps({"text": f"{words} {i}", "model": model}) + "\n")


def measure(models_dir: Path, model: str, lines: int) -> dict[str, Any]:
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = work / "in.ndjson"
        write_lines(source, lines, model)
        (work / "config.toml").write_text("")
        settings = load_settings(
            work / "config.toml",
            environ={
                "APPLIANCE_DATA_DIR": str(work / "data"),
                "APPLIANCE_MODELS_DIR": str(models_dir),
            },
        )
        spec = RunSpec(settings, ENDPOINT, model)
        result: dict[str, Any] = {"lines": lines, "cpus": cpus, "endpoint": ENDPOINT}
        with open(work / "local.ndjson", "wb") as out:
            local = run_in_process(source, out, spec, None)
        result["in_process"] = {
            "seconds": round(local.seconds, 2),
            "lines_per_s": round(local.lines / local.seconds, 1),
            "failed": local.failed,
        }
        try:
            import ray
        except ImportError:
            result["ray"] = {"skipped": "ray is not installed (pip install 'appliance[ray]')"}
            return result
        started = time.perf_counter()
        ours = not ray.is_initialized()
        if ours:
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        init_s = time.perf_counter() - started
        try:
            with open(work / "ray.ndjson", "wb") as out:
                spread = run_on_ray(source, out, spec, None, address="local", actors=cpus)
        finally:
            if ours:
                ray.shutdown()
        result["ray"] = {
            "actors": cpus,
            "init_s": round(init_s, 2),
            "seconds": round(spread.seconds, 2),
            "lines_per_s": round(spread.lines / spread.seconds, 1),
            "failed": spread.failed,
            "vs_in_process": round(local.seconds / spread.seconds, 2),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.batch_run", description=__doc__)
    parser.add_argument("models_dir", type=Path)
    parser.add_argument("--model", default="all-minilm-l6-v2")
    parser.add_argument("--lines", type=int, default=20_000)
    args = parser.parse_args()
    print("BENCH_JSON " + json.dumps(measure(args.models_dir, args.model, args.lines)), flush=True)


if __name__ == "__main__":
    main()
