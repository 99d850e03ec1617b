"""Cluster mode's cost: one replica on a real PostgreSQL and Redis against the same replica
as a single box, same model, same load (short texts, one per request, c=32, wrk), in
alternating rounds with both servers up and one loaded at a time (the medians count). Also
what each request costs the backends: Redis commands per request (Redis's own INFO
commandstats), the measured round trip of one limit script, PostgreSQL rows written per
request and the backends' CPU. Needs PostgreSQL, Redis (and wrk) from Debian.

    python -m benchmarks.cluster MODELS_DIR --model all-minilm-l6-v2 --seconds 8 --rounds 4

Prints one `BENCH_JSON {...}` line (see benchmarks/run.py)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.loadgen import Target, ensure_wrk, run_load
from benchmarks.procs import Monitor, Server, free_port, one_model_dir
from benchmarks.texts import short_single

ROOT = Path(__file__).resolve().parent.parent
LIMITS = "[limits]\nrequests_per_minute = 100000000\ntokens_per_minute = 100000000000\n"


def _replica(
    name: str, run: Path, models_dir: Path, cluster: dict[str, str] | None
) -> tuple[Server, str]:
    data = run / f"{name}-data"
    config = run / f"{name}.toml"
    text = f'data_dir = "{data}"\nmodels_dir = "{models_dir}"\n{LIMITS}'
    if cluster:
        text += (
            "[cluster]\n"
            f'database_url = "{cluster["database_url"]}"\nredis_url = "{cluster["redis_url"]}"\n'
            f'replica_id = "{name}"\n'
        )
    config.write_text(text)
    port = free_port()
    cmd = [sys.executable, "-m", "appliance.cli", "serve", "--config", str(config)]
    server = Server(
        name,
        [*cmd, "--port", str(port)],
        ready_url=f"http://127.0.0.1:{port}/readyz",
        log=run / f"{name}.log",
        cwd=run,
    )
    return server, f"http://127.0.0.1:{port}"


def _admin_key(config: Path) -> str:
    import subprocess

    made = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "keys", "create", "--name", "bench"]
        + ["--scopes", "admin", "--config", str(config)],
        capture_output=True,
        text=True,
        check=True,
    )
    return made.stdout.strip().splitlines()[-1]


def _script_round_trip(redis_url: str, calls: int = 2000) -> float:
    """Microseconds of one rate-limit decision (the Lua script) seen from a client here."""
    from appliance.cluster.health import BackendHealth
    from appliance.cluster.limits import RedisLimiter
    from appliance.cluster.redis_client import RedisBackend

    backend = RedisBackend(redis_url, BackendHealth())
    limiter = RedisLimiter(backend, fail_open=False, prefix="bench")
    limiter.admit_request("warm", 10**9, 10**9)
    started = time.perf_counter()
    for _ in range(calls):
        limiter.admit_request("rtt", 10**9, 10**9)
    elapsed = time.perf_counter() - started
    backend.close()
    return elapsed / calls * 1e6


def measure(
    models_dir: Path, model: str, seconds: float, concurrency: int, rounds: int = 4
) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from tests.cluster_servers import start_postgres, start_redis  # the same real servers

    wrk = ensure_wrk()
    tool = "wrk" if wrk else "httpx"
    shape, words = short_single(models_dir, model)
    pg, redis = start_postgres(), start_redis()
    result: dict[str, Any] = {
        "concurrency": concurrency,
        "seconds_per_run": seconds,
        "loadgen": tool,
    }
    try:
        cluster = {"database_url": pg.new_database(), "redis_url": redis.new_url()}
        with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
            run = Path(tmp)
            runs: dict[str, list[dict[str, Any]]] = {"single": [], "cluster": []}
            servers: dict[str, tuple[Server, Monitor, Target]] = {}
            try:
                served = one_model_dir(models_dir, model, run)
                for name in ("single", "cluster"):
                    server, base = _replica(
                        name, run, served, cluster if name == "cluster" else None
                    )
                    key = _admin_key(run / f"{name}.toml")
                    server.start()
                    assert server.proc is not None
                    url = f"{base}/v1/text-vectorisation"
                    target = Target(url, "text", model, {"x-api-key": key})
                    servers[name] = (server, Monitor(server.proc.pid), target)
                    run_load(tool, target, shape, words, concurrency=8, duration=2, wrk_path=wrk)
                # Alternating rounds, both servers up (one loaded at a time): a machine whose
                # speed drifts during the run (shared hosts do) moves both alike.
                for _ in range(rounds):
                    for name, (_server, monitor, target) in servers.items():
                        monitor.wait_idle()
                        runs[name].append(
                            _one_run(name, target, monitor, shape, words, tool, wrk, seconds,
                                     concurrency, cluster, pg, redis)
                        )  # fmt: skip
            finally:
                for server, monitor, _target in servers.values():
                    monitor.close()
                    server.stop()
            median = {k: statistics.median(p["requests_per_s"] for p in v) for k, v in runs.items()}
            result.update(
                runs=runs,
                single_requests_per_s=median["single"],
                cluster_requests_per_s=median["cluster"],
                cluster_vs_single=round(median["cluster"] / median["single"], 3),
                limit_script_round_trip_us=round(_script_round_trip(cluster["redis_url"]), 1),
            )
    finally:
        redis.stop()
        pg.stop()
    return result


def _backend_cpu(pg: Any, redis: Any) -> float:
    """CPU seconds used so far by the PostgreSQL server (all its processes) and Redis."""
    import psutil

    roots = []
    pid_file = pg.data / "db" / "postmaster.pid"
    roots.append(int(pid_file.read_text().split()[0]))
    roots.append(redis.proc.pid)
    total = 0.0
    for pid in roots:
        try:
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                t = p.cpu_times()
                total += t.user + t.system
        except psutil.Error:
            continue
    return total


TOP_LEVEL = ("evalsha", "mget", "set", "get")
"""Commands counted by Redis (those a Lua script runs count too: the script's MGET of the
second cache level shows as mget, though it travels inside the evalsha)."""


def _one_run(
    name: str,
    target: Target,
    monitor: Monitor,
    shape: Any,
    words: list[str],
    tool: str,
    wrk: str | None,
    seconds: float,
    concurrency: int,
    cluster: dict[str, str],
    pg: Any,
    redis: Any,
) -> dict[str, Any]:
    clustered = name == "cluster"
    stats0 = _redis_calls(cluster["redis_url"]) if clustered else {}
    rows0 = _rows(cluster["database_url"]) if clustered else 0
    backends0 = _backend_cpu(pg, redis) if clustered else 0.0
    cpu0, t0 = monitor.cpu_seconds(), time.perf_counter()
    res = run_load(
        tool, target, shape, words, concurrency=concurrency, duration=seconds, wrk_path=wrk
    )
    wall = time.perf_counter() - t0
    ok = res["requests"] - res["errors_status"]
    point: dict[str, Any] = {
        "requests_per_s": round(ok / (res["duration_s"] or seconds), 1),
        "p50_ms": round(res["p50_ms"], 2),
        "p99_ms": round(res["p99_ms"], 2),
        "errors": res["errors_status"],
        "cpu_cores": round((monitor.cpu_seconds() - cpu0) / wall, 2),
    }
    if clustered:
        # Here PostgreSQL and Redis share this machine's cores with the replica and wrk; at a
        # site they have their own.
        point["backends_cpu_cores"] = round((_backend_cpu(pg, redis) - backends0) / wall, 2)
        time.sleep(1)  # the usage writer's batches land
        after = _redis_calls(cluster["redis_url"])
        point["redis_commands_per_request"] = {
            c: round((after[c] - stats0[c]) / max(ok, 1), 2) for c in TOP_LEVEL
        }
        point["postgres_rows_per_request"] = round(
            (_rows(cluster["database_url"]) - rows0) / max(ok, 1), 2
        )
    return point


def _redis_calls(url: str) -> dict[str, int]:
    import redis

    client = redis.Redis.from_url(url)
    stats = client.info("commandstats")
    client.close()
    return {c: int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in TOP_LEVEL}


def _rows(url: str) -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM requests").fetchone()
    return int(row[0]) if row else 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description=__doc__)
    parser.add_argument("models_dir", type=Path)
    parser.add_argument("--model", default="all-minilm-l6-v2")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    out = measure(
        args.models_dir.resolve(), args.model, args.seconds, args.concurrency, args.rounds
    )
    print("BENCH_JSON " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
