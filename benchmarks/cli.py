"""`appliance bench` (and `python -m benchmarks`): options in, one run, files out."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from benchmarks.run import ALL_SYSTEMS, Options, run_bench


def bench_command(
    *,
    systems: str = ",".join(ALL_SYSTEMS),
    quick: bool = False,
    out: Path | None = None,
    models_dir: Path | None = None,
    model: str = "all-minilm-l6-v2",
    loadgen: str = "auto",
    duration: float | None = None,
    concurrency: str | None = None,
    sizes: bool | None = None,
) -> dict:
    chosen = tuple(s.strip() for s in systems.split(",") if s.strip())
    unknown = [s for s in chosen if s not in ALL_SYSTEMS]
    if unknown or not chosen:
        raise SystemExit(f"--systems: unknown {unknown}; choose from {', '.join(ALL_SYSTEMS)}")
    if loadgen not in ("auto", "wrk", "httpx"):
        raise SystemExit("--loadgen: auto, wrk or httpx")
    levels = tuple(int(c) for c in concurrency.split(",")) if concurrency else None
    argv = sys.argv[1:] if Path(sys.argv[0]).name == "appliance" else ["bench", *sys.argv[1:]]
    opts = Options(
        systems=chosen,
        quick=quick,
        models_dir=models_dir.resolve() if models_dir else None,
        model=model,
        loadgen=loadgen,
        duration=duration,
        concurrency=levels,
        sizes=sizes,
        command="appliance " + " ".join(shlex.quote(a) for a in argv),
    )
    if out is not None:
        opts.out = out.resolve()
    return run_bench(opts)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--systems", default=",".join(ALL_SYSTEMS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--models-dir", type=Path)
    parser.add_argument("--model", default="all-minilm-l6-v2")
    parser.add_argument("--loadgen", default="auto")
    parser.add_argument("--duration", type=float)
    parser.add_argument("--concurrency")
    parser.add_argument("--sizes", action=argparse.BooleanOptionalAction, default=None)
    args = parser.parse_args()
    bench_command(**vars(args))
