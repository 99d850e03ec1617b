"""The harness behind `appliance bench`: sets up every system, drives each with the same load,
measures, and writes benchmarks/results/ (JSON, Markdown, PNG). See benchmarks/results/README.md.

Systems: "appliance" (`appliance serve`, INT8), "torch" (PyTorch fp32 behind litestar+uvicorn,
benchmarks/torch_server.py), "infinity" (infinity-emb, optimum/ONNX engine, the same INT8
file, its own venv), "engine" (the INT8 session in-process with ideal batches: the ceiling).
A system that cannot be set up is reported as skipped with the reason, never dropped."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from benchmarks import infinity, report
from benchmarks.fidelity import cosines
from benchmarks.loadgen import Target, ensure_wrk, run_load
from benchmarks.procs import Monitor, Server, free_port, one_model_dir
from benchmarks.texts import FIDELITY_SENTENCES, Shape, make_shapes, vocabulary_words

ALL_SYSTEMS = ("appliance", "torch", "infinity", "engine", "batch-run", "cluster")
HTTP_SYSTEMS = ("appliance", "torch", "infinity")
PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
DEFAULT_MODEL = "all-minilm-l6-v2"


@dataclass
class Options:
    systems: tuple[str, ...] = ALL_SYSTEMS
    quick: bool = False
    out: Path = PACKAGE_DIR / "results"
    work: Path = PACKAGE_DIR / ".cache"
    models_dir: Path | None = None
    """Use the models already exported there (default: export the default model into work)."""
    model: str = DEFAULT_MODEL
    loadgen: str = "auto"  # auto | wrk | httpx
    duration: float | None = None
    concurrency: tuple[int, ...] | None = None
    shapes: tuple[str, ...] | None = None
    """Subset of short-single, short-batch, medium-single, medium-batch."""
    sizes: bool | None = None
    """Measure a fresh serving venv (default: yes, but not under --quick)."""
    command: str = "appliance bench"
    log: Callable[[str], None] = field(default=lambda msg: print(msg, flush=True))

    @property
    def point_seconds(self) -> float:
        return self.duration or (3.0 if self.quick else 8.0)

    @property
    def levels(self) -> tuple[int, ...]:
        return self.concurrency or ((1, 32) if self.quick else (1, 8, 32, 128))


def _json_line(stdout: str) -> dict[str, Any]:
    for line in stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON ") :])
    raise RuntimeError(f"no result printed: {stdout[-400:]!r}")


def _subprocess_json(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> Any:
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.strip()[-600:]}")
    return _json_line(proc.stdout)


def _machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    return {
        "cpu": cpu or platform.processor(),
        "cores": len(os.sched_getaffinity(0)),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def export_default(models_dir: Path, slug: str, log: Callable[[str], None]) -> float:
    """Export the default model with the project's exporter (once; kept in the cache)."""
    if (models_dir / slug / "manifest.json").is_file():
        return 0.0
    from exporters.defaults import DEFAULTS, package_folder
    from exporters.export import export_model

    model = next((m for m in DEFAULTS if m.slug == slug), None)
    if model is None:
        raise RuntimeError(f"{slug} is not a default model; pass --models-dir with it exported")
    log(f"exporting {slug} with the project's exporter into {models_dir} ...")
    start = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    export_model(
        package_folder(model),
        model.task,
        out_dir=models_dir,
        slug=model.slug,
        name=model.name,
        description=model.description,
        options=dict(model.options),
    )
    return time.perf_counter() - start


def checkpoint_of(model_dir: Path, manifest: Any) -> Path | None:
    """The PyTorch checkpoint the model was exported from (for the fp32 systems)."""
    try:
        from exporters.defaults import DEFAULTS, package_folder

        for m in DEFAULTS:
            if m.slug == manifest.slug:
                return package_folder(m)
    except Exception:  # noqa: BLE001 - the exporter is optional here
        pass
    source = Path(getattr(manifest, "source", "") or "")
    return source if (source / "config.json").is_file() else None


def dir_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            p = Path(root) / f
            if not p.is_symlink():
                with contextlib.suppress(OSError):
                    total += p.stat().st_size
    return total


def measure_sizes(work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """A fresh serving-only venv (`pip install .`) against the venv running this (export)."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serving-venv-", dir=work) as tmp:
        venv = Path(tmp) / "venv"
        log("measuring a fresh serving venv (pip install .) ...")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        proc = subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(REPO_ROOT)],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if proc.returncode != 0:
            out["serving_skipped"] = f"pip install . failed: {proc.stderr.strip()[-300:]}"
        else:
            out["serving_venv_mb"] = round(dir_size(venv) / 1e6, 1)
            out["serving_install_s"] = round(time.perf_counter() - start, 1)
            check = subprocess.run(
                [str(venv / "bin" / "python"), "-c", "import torch"],
                capture_output=True,
                check=False,
            )
            out["serving_has_torch"] = check.returncode == 0
    prefix = Path(sys.prefix)
    has_torch = any(prefix.glob("lib/python*/site-packages/torch"))
    if has_torch:
        out["export_venv_mb"] = round(dir_size(prefix) / 1e6, 1)
        out["export_venv"] = f"{prefix} (the export + dev extras: torch, transformers, optimum)"
    else:
        out["export_venv_skipped"] = f"{prefix} has no torch: not an export venv"
    return out


@dataclass
class HttpSystem:
    name: str
    server: Server
    target: Target
    vectors: Callable[[list[str]], list[list[float]]]
    setup_s: float = 0.0


def _appliance(
    work: Path, run_dir: Path, models_dir: Path, model: str, max_queue: int
) -> HttpSystem:
    data = run_dir / "appliance-data"
    data.mkdir(parents=True, exist_ok=True)
    models_dir = one_model_dir(models_dir, model, run_dir)
    config = run_dir / "appliance.toml"
    # The defaults but for limits, which would throttle a load test (600 requests/minute per
    # key) and a queue big enough for c=128 x 32 texts. Cache on, as shipped: every load body
    # is different, so these runs measure misses; cache hits are measured separately.
    config.write_text(
        f'data_dir = "{data}"\nmodels_dir = "{models_dir}"\n'
        "[limits]\nrequests_per_minute = 100000000\ntokens_per_minute = 100000000000\n"
        f"[runtime]\nmax_queue = {max_queue}\n"
    )
    port = free_port()
    server = Server(
        "appliance",
        [
            sys.executable,
            "-m",
            "appliance.cli",
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
        ],
        ready_url=f"http://127.0.0.1:{port}/readyz",
        log=run_dir / "appliance.log",
        cwd=run_dir,
    )
    base = f"http://127.0.0.1:{port}"
    target = Target(f"{base}/v1/text-vectorisation", "text", model, {})

    def vectors(texts: list[str]) -> list[list[float]]:
        r = httpx.post(target.url, json={"text": texts, "model": model}, headers=target.headers)
        r.raise_for_status()
        return r.json()["vector"]

    return HttpSystem("appliance", server, target, vectors)


def _torch(run_dir: Path, checkpoint: Path, model: str, max_tokens: int) -> HttpSystem:
    port = free_port()
    server = Server(
        "torch",
        [
            sys.executable,
            "-m",
            "benchmarks.torch_server",
            "--model",
            str(checkpoint),
            "--port",
            str(port),
            "--max-tokens",
            str(max_tokens),
        ],
        ready_url=f"http://127.0.0.1:{port}/readyz",
        log=run_dir / "torch.log",
        cwd=REPO_ROOT,
        env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    target = Target(f"http://127.0.0.1:{port}/v1/text-vectorisation", "text", model, {})

    def vectors(texts: list[str]) -> list[list[float]]:
        r = httpx.post(target.url, json={"text": texts, "model": model}, timeout=60)
        r.raise_for_status()
        return r.json()["vector"]

    return HttpSystem("torch", server, target, vectors)


def _infinity(
    work: Path, run_dir: Path, checkpoint: Path, onnx_file: Path, log: Callable[[str], None]
) -> HttpSystem:
    venv = work / "venv-infinity"
    log(f"setting up infinity-emb in {venv} (pinned, offline from the registries) ...")
    setup_s = infinity.ensure_venv(venv, run_dir / "infinity-setup.log")
    folder = infinity.model_folder(checkpoint, onnx_file, run_dir / "infinity-model")
    port = free_port()
    server = Server(
        "infinity",
        infinity.command(venv, folder, port),
        ready_url=f"http://127.0.0.1:{port}/health",
        log=run_dir / "infinity.log",
        cwd=run_dir,
        env=infinity.ENV,
    )
    target = Target(f"http://127.0.0.1:{port}/embeddings", "input", "bench", {})

    def vectors(texts: list[str]) -> list[list[float]]:
        r = httpx.post(target.url, json={"input": texts, "model": "bench"}, timeout=60)
        r.raise_for_status()
        return [d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])]

    return HttpSystem("infinity", server, target, vectors, setup_s=setup_s)


def cache_latency(system: HttpSystem, words: list[str], n: int = 40) -> dict[str, Any]:
    """The same request twice through the appliance: the second is a cache hit."""
    import random

    from benchmarks.texts import make_text

    rng = random.Random(9)
    miss, hit, statuses = [], [], []
    with httpx.Client(headers=system.target.headers, timeout=30) as client:
        for i in range(n):
            text = f"cache probe {i} " + make_text(rng, words, 6, 8)
            body = {"text": text, "model": system.target.model}
            for bucket in (miss, hit):
                t0 = time.perf_counter()
                r = client.post(system.target.url, json=body)
                bucket.append((time.perf_counter() - t0) * 1e3)
                statuses.append(r.headers.get("x-cache", ""))
    hits = statuses[1::2]
    return {
        "requests": n,
        "hit_p50_ms": round(statistics.median(hit), 3),
        "hit_p95_ms": round(sorted(hit)[int(0.95 * (len(hit) - 1))], 3),
        "miss_p50_ms": round(statistics.median(miss), 3),
        "hits_confirmed": sum(1 for s in hits if s.upper() == "HIT"),
    }


def measured_load(
    system: HttpSystem,
    shape: Shape,
    words: list[str],
    concurrency: int,
    opts: Options,
    tool: str,
    wrk_path: str | None,
    monitor: Monitor,
) -> tuple[dict[str, Any], float, float]:
    """One point's load: the generator's result, the wall seconds and the server's CPU
    seconds (its process tree) over it."""
    cpu0, t0 = monitor.cpu_seconds(), time.perf_counter()
    res = run_load(
        tool,
        system.target,
        shape,
        words,
        concurrency=concurrency,
        duration=opts.point_seconds,
        wrk_path=wrk_path,
    )
    return res, time.perf_counter() - t0, monitor.cpu_seconds() - cpu0


def request_path(
    system: HttpSystem,
    words: list[str],
    opts: Options,
    tool: str,
    wrk_path: str | None,
    monitor: Monitor,
    concurrency: int = 8,
) -> dict[str, Any]:
    """The request path alone: one short text sent over and over at c=8, so that after the
    first every answer is a cache hit (no model), with auth, limits, cache headers, usage
    records and the access log all on. CPU per request is the server's CPU time over the
    run divided by the answers (all threads, so the usage and cache writers count too)."""
    shape = Shape("cache-hits", "short", 1, 1, 1, fixed="the request path alone, a cached text")
    run_load(tool, system.target, shape, words, concurrency=2, duration=1, wrk_path=wrk_path)
    res, wall, cpu = measured_load(system, shape, words, concurrency, opts, tool, wrk_path, monitor)
    ok = res["requests"] - res["errors_status"]
    secs = res["duration_s"] or opts.point_seconds
    point = {
        "concurrency": concurrency,
        "requests": res["requests"],
        "errors": res["errors_status"] + res["timeouts"] + res["errors_connect"],
        "requests_per_s": round(ok / secs, 1),
        "server_cpu_us_per_request": round(cpu / ok * 1e6, 1) if ok else None,
        "p50_ms": round(res["p50_ms"], 2),
        "p99_ms": round(res["p99_ms"], 2),
        "server_cpu_pct": round(cpu / wall * 100, 1),
        "loadgen_cpu_pct": round(res["loadgen_cpu_s"] / wall * 100, 1),
    }
    opts.log(
        f"  {system.name:9} cache hits    c={concurrency:<3} {point['requests_per_s']:8.1f} req/s "
        f"{point['server_cpu_us_per_request']} us of server CPU per request, "
        f"p50 {point['p50_ms']} ms, p99 {point['p99_ms']} ms"
    )
    monitor.wait_idle()
    return point


def drive(
    system: HttpSystem,
    shapes: list[Shape],
    words: list[str],
    opts: Options,
    tool: str,
    wrk_path: str | None,
    monitor: Monitor,
) -> list[dict[str, Any]]:
    points = []
    for shape in shapes:
        last_texts_s: float | None = None
        for c in opts.levels:
            point: dict[str, Any] = {
                "system": system.name,
                "shape": shape.name,
                "length": shape.length,
                "texts_per_request": shape.per_request,
                "tokens_per_text": shape.tokens_per_text,
                "concurrency": c,
            }
            round_s = c * shape.per_request / last_texts_s if last_texts_s else 0.0
            # Closed loop: `c` requests are always in flight, so a point leaves about one round
            # of work behind it (drained before the next point). Past two points' time per
            # round, the point would say little and cost a lot: skipped, and said so.
            if round_s > opts.point_seconds * 2:
                point["skipped"] = (
                    f"one round of {c} requests would take ~{round_s:.0f}s at the "
                    f"{last_texts_s:.0f} texts/s measured at lower concurrency"
                )
                opts.log(f"  {system.name:9} {shape.name:13} c={c:<3} skipped: {point['skipped']}")
                points.append(point)
                continue
            monitor.reset_peak()
            res, wall, cpu = measured_load(system, shape, words, c, opts, tool, wrk_path, monitor)
            secs = res["duration_s"] or opts.point_seconds
            ok = res["requests"] - res["errors_status"]
            texts_s = ok * shape.per_request / secs
            point.update(
                {
                    "duration_s": round(secs, 2),
                    "requests": res["requests"],
                    "errors": res["errors_status"]
                    + res["timeouts"]
                    + res["errors_connect"]
                    + res["errors_read"]
                    + res["errors_write"],
                    "requests_per_s": round(ok / secs, 2),
                    "texts_per_s": round(texts_s, 1),
                    "tokens_per_s": round(texts_s * shape.tokens_per_text, 0),
                    "p50_ms": round(res["p50_ms"], 2),
                    "p95_ms": round(res["p95_ms"], 2),
                    "p99_ms": round(res["p99_ms"], 2),
                    "mean_ms": round(res["latency_mean_ms"], 2),
                    "max_ms": round(res["latency_max_ms"], 2),
                    "cpu_pct": round(cpu / wall * 100, 1),
                    "loadgen_cpu_pct": round(res["loadgen_cpu_s"] / wall * 100, 1),
                    "peak_rss_mb": round(monitor.peak_rss / 1e6, 1),
                }
            )
            if res["requests"] < 2 * c:
                point["note"] = "fewer than two rounds completed: latency percentiles are rough"
            last_texts_s = texts_s if texts_s > 0 else None
            opts.log(
                f"  {system.name:9} {shape.name:13} c={c:<3} {point['requests_per_s']:8.1f} req/s "
                f"{point['texts_per_s']:8.1f} texts/s  p50 {point['p50_ms']:7.1f} ms  "
                f"p99 {point['p99_ms']:7.1f} ms  cpu {point['cpu_pct']:5.0f}%  "
                f"rss {point['peak_rss_mb']:6.0f} MB  errors {point['errors']}"
            )
            point["drain_s"] = round(monitor.wait_idle(cap=opts.point_seconds * 3 + 10), 2)
            points.append(point)
    return points


def run_bench(opts: Options) -> dict[str, Any]:
    started = time.perf_counter()
    log = opts.log
    unknown = set(opts.systems) - set(ALL_SYSTEMS)
    if unknown:
        raise ValueError(f"unknown systems: {', '.join(sorted(unknown))} (known: {ALL_SYSTEMS})")
    opts.work.mkdir(parents=True, exist_ok=True)
    opts.out.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=opts.work))
    result: dict[str, Any] = {
        "command": opts.command,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "settings": {
            "quick": opts.quick,
            "seconds_per_point": opts.point_seconds,
            "concurrency": list(opts.levels),
            "systems": list(opts.systems),
        },
        "systems": {},
        "points": [],
        "fidelity_sentences": len(FIDELITY_SENTENCES),
    }
    systems = result["systems"]
    # --- the load generator
    tool, why = opts.loadgen, ""
    wrk_path = None
    if tool in ("auto", "wrk"):
        wrk_path = ensure_wrk()
        if wrk_path:
            tool = "wrk"
        elif opts.loadgen == "wrk":
            raise RuntimeError("wrk is not installed and could not be installed (apt-get)")
        else:
            tool, why = "httpx", "wrk is missing and could not be installed"
    elif tool == "httpx":
        why = "asked for with --loadgen httpx"
    result["loadgen"] = {
        "tool": tool,
        "note": why or "wrk 4.1 (1 thread), Lua script: a different random body for every request",
    }
    if tool == "httpx":
        result["loadgen"]["note"] = (
            f"async httpx client in its own process ({why}); it costs more CPU than wrk, on the "
            "same cores as the server"
        )
    log(f"load generator: {tool}; results in {opts.out}; work files in {run_dir}")
    # --- the model
    if opts.models_dir is None:
        models_dir = opts.work / "models"
        export_s = export_default(models_dir, opts.model, log)
    else:
        models_dir, export_s = opts.models_dir, 0.0
    from appliance.models.manifest import read_manifest

    model_dir = models_dir / opts.model
    manifest = read_manifest(model_dir)
    tokenizer_path = model_dir / manifest.files["tokenizer"].path
    onnx_file = model_dir / manifest.files["model"].path
    checkpoint = checkpoint_of(model_dir, manifest)
    result["model"] = {
        "slug": manifest.slug,
        "name": manifest.name,
        "int8_mb": round(onnx_file.stat().st_size / 1e6, 1),
        "fp32_mb": round(manifest.sizes.get("fp32_bytes", 0) / 1e6, 1) or None,
        "export_s": round(export_s, 1) if export_s else "cached",
        "checkpoint": str(checkpoint) if checkpoint else None,
    }
    words = vocabulary_words(tokenizer_path)
    shapes = make_shapes(tokenizer_path, words, manifest.max_tokens)
    if opts.shapes:
        shapes = [s for s in shapes if s.name in opts.shapes]
    result["shapes"] = [asdict(s) for s in shapes]
    max_queue = max(4096, max(opts.levels) * max(s.per_request for s in shapes) * 2)
    # --- sizes (before any load: pip would disturb it)
    do_sizes = opts.sizes if opts.sizes is not None else not opts.quick
    if do_sizes:
        try:
            result["sizes"] = measure_sizes(opts.work, log)
        except Exception as exc:  # noqa: BLE001 - reported, never fatal
            result["sizes"] = {"skipped": f"{type(exc).__name__}: {exc}"}
    else:
        result["sizes"] = {"skipped": "not measured under --quick (pass --sizes to force)"}
    # --- fp32 reference vectors for fidelity
    reference = None
    if checkpoint is not None:
        try:
            reference = _subprocess_json(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.fidelity",
                    str(checkpoint),
                    "--max-tokens",
                    str(manifest.max_tokens),
                ],
                timeout=300,
                env={"HF_HUB_OFFLINE": "1"},
            )["vectors"]
        except Exception as exc:  # noqa: BLE001
            result["fidelity_skipped"] = f"fp32 reference failed: {exc}"
    else:
        result["fidelity_skipped"] = "no PyTorch checkpoint found for this model"
    # --- the raw engine ceiling
    if "engine" in opts.systems:
        spec = run_dir / "engine-spec.json"
        spec.write_text(json.dumps({"shapes": [asdict(s) for s in shapes], "words": words}))
        log("measuring the raw engine ceiling (INT8 session in-process, ideal batches) ...")
        try:
            engine = _subprocess_json(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.engine",
                    str(model_dir),
                    "--spec",
                    str(spec),
                    "--seconds",
                    str(max(1.0, opts.point_seconds / 2)),
                ],
                timeout=600,
            )
            systems["engine"] = {"status": "ok", **engine}
            for p in engine["points"]:
                log(
                    f"  engine    {p['length']:6} batch {p['batch']:<3} {p['way']:20} "
                    f"{p['texts_per_s']:8.1f} texts/s  {p['ms_per_call']:8.2f} ms/call"
                )
        except Exception as exc:  # noqa: BLE001
            systems["engine"] = {"status": "skipped", "reason": str(exc)}
    # --- `appliance batch run`: in this process and on a local Ray, same file
    if "batch-run" in opts.systems:
        log("measuring appliance batch run, in-process and on Ray ...")
        lines = 4000 if opts.quick else 20_000
        try:
            result["batch_run"] = _subprocess_json(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.batch_run",
                    str(models_dir),
                    "--model",
                    opts.model,
                    "--lines",
                    str(lines),
                ],
                timeout=900,
            )
        except Exception as exc:  # noqa: BLE001 - reported, never fatal
            result["batch_run"] = {"skipped": f"{type(exc).__name__}: {exc}"}
    # --- cluster mode against a single box (PostgreSQL + Redis started for it)
    if "cluster" in opts.systems:
        log("measuring cluster mode (PostgreSQL + Redis) against a single box ...")
        try:
            result["cluster"] = _subprocess_json(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.cluster",
                    str(models_dir),
                    "--model",
                    opts.model,
                    "--seconds",
                    str(opts.point_seconds),
                ],
                timeout=900,
            )
        except Exception as exc:  # noqa: BLE001 - reported, never fatal
            result["cluster"] = {"skipped": f"{type(exc).__name__}: {exc}"}
    # --- the HTTP systems, one at a time
    for name in HTTP_SYSTEMS:
        if name not in opts.systems:
            continue
        entry: dict[str, Any] = {"status": "ok"}
        systems[name] = entry
        try:
            if name == "appliance":
                system = _appliance(opts.work, run_dir, models_dir, opts.model, max_queue)
            elif checkpoint is None:
                raise RuntimeError("no PyTorch checkpoint found for this model")
            elif name == "torch":
                system = _torch(run_dir, checkpoint, opts.model, manifest.max_tokens)
            else:
                system = _infinity(opts.work, run_dir, checkpoint, onnx_file, log)
                entry["setup_s"] = round(system.setup_s, 1) if system.setup_s else "cached"
        except Exception as exc:  # noqa: BLE001 - a system that cannot be set up is skipped
            entry.update(status="skipped", reason=f"{type(exc).__name__}: {exc}")
            log(f"{name}: skipped: {entry['reason']}")
            continue
        log(f"starting {name} ...")
        try:
            entry["startup_s"] = round(system.server.start(), 2)
        except Exception as exc:  # noqa: BLE001
            entry.update(status="skipped", reason=f"did not start: {exc}")
            log(f"{name}: skipped: {entry['reason']}")
            continue
        assert system.server.proc is not None
        monitor = Monitor(system.server.proc.pid)
        try:
            if name == "appliance":
                key = (run_dir / "appliance-data" / "admin.key").read_text().strip()
                system.target.headers["x-api-key"] = key
            entry["ready_rss_mb"] = round(monitor.rss() / 1e6, 1)
            vectors = system.vectors(FIDELITY_SENTENCES)
            entry["dimension"] = len(vectors[0])
            if reference is not None:
                entry["fidelity_vs_fp32"] = cosines(vectors, reference)
            log(f"{name}: ready in {entry['startup_s']}s; warming up ...")
            for shape in shapes:  # warm-up: every shape once, results thrown away
                run_load(
                    tool,
                    system.target,
                    shape,
                    words,
                    concurrency=4 if shape.batch else 8,
                    duration=1 if opts.quick else 2,
                    wrk_path=wrk_path,
                )
            monitor.wait_idle()
            entry["idle_rss_mb"] = round(monitor.rss() / 1e6, 1)
            if name == "appliance":
                entry["cache"] = cache_latency(system, words)
                entry["request_path"] = request_path(system, words, opts, tool, wrk_path, monitor)
            points = drive(system, shapes, words, opts, tool, wrk_path, monitor)
            result["points"].extend(points)
            entry["peak_rss_mb"] = max((p.get("peak_rss_mb", 0) for p in points), default=0)
        except Exception as exc:  # noqa: BLE001 - keep what was measured, say what failed
            entry.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
            log(f"{name}: failed: {entry['reason']} (server log: {system.server.tail()})")
        finally:
            monitor.close()
            system.server.stop()
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["total_s"] = round(time.perf_counter() - started, 1)
    result["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    report.summarise(result)
    paths = report.write(result, opts.out)
    if all(s.get("status") == "ok" for s in systems.values()):
        shutil.rmtree(run_dir, ignore_errors=True)
    else:
        log(f"server logs kept in {run_dir}")
    log(report.console_summary(result))
    for p in paths:
        log(f"wrote {p}")
    log(f"command: {opts.command}")
    return result
