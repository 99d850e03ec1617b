"""Ratios, targets (met / not met, with the figure), and the files: result.json, result.md,
result.png under the output folder (benchmarks/results/ by default)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

NAMES = {
    "appliance": "appliance (INT8)",
    "torch": "PyTorch fp32",
    "infinity": "infinity-emb (ONNX, same INT8 file)",
    "engine": "raw engine ceiling",
}
KEY_SHAPE = "short-single"
KEY_LEVEL = 32


def _points(result: dict[str, Any], system: str) -> dict[tuple[str, int], dict[str, Any]]:
    return {
        (p["shape"], p["concurrency"]): p
        for p in result["points"]
        if p["system"] == system and "skipped" not in p
    }


def _engine_ceiling(result: dict[str, Any], length: str) -> float | None:
    engine = result["systems"].get("engine", {})
    batches = [p for p in engine.get("points", []) if p["length"] == length]
    return max((p["texts_per_s"] for p in batches), default=None)


def summarise(result: dict[str, Any]) -> None:
    """Adds `ratios` and `targets` to the result."""
    app = _points(result, "appliance")
    ratios = []
    for (shape, c), a in sorted(app.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        row: dict[str, Any] = {"shape": shape, "concurrency": c}
        for other in ("torch", "infinity"):
            o = _points(result, other).get((shape, c))
            if o and o["texts_per_s"] > 0:
                row[f"vs_{other}_throughput"] = round(a["texts_per_s"] / o["texts_per_s"], 2)
                if o["p99_ms"] > 0:
                    row[f"vs_{other}_p99"] = round(a["p99_ms"] / o["p99_ms"], 2)
        ceiling = _engine_ceiling(result, a["length"])
        if ceiling:
            row["vs_engine_ceiling"] = round(a["texts_per_s"] / ceiling, 2)
        ratios.append(row)
    result["ratios"] = ratios

    targets = []

    def add(name: str, status: str | None, figure: str) -> None:
        targets.append(
            {
                "target": name,
                "status": "not measured" if status is None else status,
                "figure": figure,
            }
        )

    def met(ok: bool) -> str:
        return "met" if ok else "not met"

    key = app.get((KEY_SHAPE, KEY_LEVEL))
    for other, factor in (("torch", 3.0), ("infinity", 1.5)):
        name = f"throughput >= {factor:g}x {NAMES[other]} at c=32, short texts, p99 no worse"
        o = _points(result, other).get((KEY_SHAPE, KEY_LEVEL))
        if key and o and o["texts_per_s"] > 0:
            ratio = key["texts_per_s"] / o["texts_per_s"]
            p99_ok = key["p99_ms"] <= o["p99_ms"]
            add(
                name,
                met(ratio >= factor and p99_ok),
                f"{ratio:.2f}x ({key['texts_per_s']:.0f} vs {o['texts_per_s']:.0f} texts/s); "
                f"p99 {key['p99_ms']:.1f} vs {o['p99_ms']:.1f} ms",
            )
        else:
            why = result["systems"].get(other, {}).get("reason", "not run")
            add(name, None, f"no figure: {why}" if not o else "no appliance figure")
    ceiling = _engine_ceiling(result, "short")
    if key and ceiling:
        share = key["texts_per_s"] / ceiling
        add(
            ">= 70% of the raw engine ceiling at c=32 (short texts)",
            met(share >= 0.7),
            f"{share:.0%} ({key['texts_per_s']:.0f} of {ceiling:.0f} texts/s)",
        )
    else:
        add(">= 70% of the raw engine ceiling at c=32 (short texts)", None, "no figure")
    one = app.get((KEY_SHAPE, 1))
    add(
        "single request p50 <= 3 ms at c=1, short text",
        met(one["p50_ms"] <= 3) if one else None,
        f"{one['p50_ms']:.2f} ms" if one else "no figure",
    )
    path = result["systems"].get("appliance", {}).get("request_path")
    add(
        "request path >= 5,000 cache hits/s at c=8 (<= 200 us of server CPU per request)",
        met(path["requests_per_s"] >= 5000 and path["server_cpu_us_per_request"] <= 200)
        if path
        else None,
        f"{path['requests_per_s']:.0f} requests/s, {path['server_cpu_us_per_request']:.0f} us "
        f"of server CPU per request (p50 {path['p50_ms']:.2f} ms; wrk used "
        f"{path['loadgen_cpu_pct']:.0f}% of a core)"
        if path
        else "no figure",
    )
    cache = result["systems"].get("appliance", {}).get("cache")
    add(
        "cache hit < 2 ms",
        met(cache["hit_p50_ms"] < 2) if cache else None,
        f"p50 {cache['hit_p50_ms']:.2f} ms, p95 {cache['hit_p95_ms']:.2f} ms "
        f"(miss p50 {cache['miss_p50_ms']:.2f} ms; {cache['hits_confirmed']}/{cache['requests']} "
        "answered X-Cache: HIT)"
        if cache
        else "no figure",
    )
    sizes = result.get("sizes", {})
    mb = sizes.get("serving_venv_mb")
    add(
        "serving venv < 300 MB",
        met(mb < 300) if mb else None,
        f"{mb:.0f} MB (export venv {sizes.get('export_venv_mb', 0):.0f} MB)"
        if mb
        else sizes.get("skipped") or sizes.get("serving_skipped", "no figure"),
    )
    appliance = result["systems"].get("appliance", {})
    rss = appliance.get("idle_rss_mb")
    # The bench serves the embedding model only: the generation default (SmolLM2) is not
    # part of it, so this figure says nothing about both defaults loaded (see the README).
    add(
        "RSS < 250 MB with the default embedding model loaded (the bench serves no other)",
        met(rss < 250) if rss else None,
        f"{rss:.0f} MB after warm-up, idle (peak under load {appliance.get('peak_rss_mb', 0):.0f}"
        f" MB); models: {result.get('model', {}).get('slug')}"
        if rss
        else "no figure",
    )
    cluster = result.get("cluster") or {}
    ratio = cluster.get("cluster_vs_single")
    add(
        "cluster mode >= 85% of a single box's requests/s (c=32 short)",
        met(ratio >= 0.85) if ratio else None,
        f"{ratio:.2f}x ({cluster['cluster_requests_per_s']:.0f} vs "
        f"{cluster['single_requests_per_s']:.0f} requests/s)"
        if ratio
        else cluster.get("skipped", "not measured (--systems cluster)"),
    )
    result["targets"] = targets


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None or v == "":
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Benchmark: appliance vs PyTorch fp32 vs infinity-emb vs the raw engine",
        "",
        f"Command: `{result['command']}`",
        "",
        f"- When: {result['started_at']}, took {result['total_s']:.0f} s in all.",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; Python {m['python']}, "
        f"onnxruntime {m['onnxruntime']}. Load average at start {m['load_average_at_start']}, "
        f"at end {m.get('load_average_at_end')}: other work on this machine while it ran "
        "lowers throughput and raises latency of every system alike.",
        f"- Model: {result['model']['name']} ({result['model']['slug']}); INT8 file "
        f"{result['model']['int8_mb']} MB (fp32 {result['model']['fp32_mb']} MB).",
        f"- Load: {result['loadgen']['tool']} — {result['loadgen']['note']}; closed loop, "
        f"{result['settings']['seconds_per_point']:g} s per point.",
        "- Texts: "
        + "; ".join(
            f"{s['name']}: {s['per_request']} text(s) per request, ~{s['tokens_per_text']:g} tokens"
            for s in result["shapes"]
        )
        + ".",
        "",
        "## Targets",
        "",
        "| target | figure | status |",
        "|---|---|---|",
    ]
    for t in result["targets"]:
        mark = {"met": "**met**", "not met": "**not met**"}.get(t["status"], t["status"])
        lines.append(f"| {t['target']} | {t['figure']} | {mark} |")
    lines += [
        "",
        "## Systems",
        "",
        "| system | status | start-up to ready | RSS ready / idle / peak | "
        "fidelity vs fp32 (mean / min cosine) |",
        "|---|---|---|---|---|",
    ]
    for name, s in result["systems"].items():
        if name == "engine":
            status = s["status"] if s["status"] == "ok" else f"skipped: {s.get('reason')}"
            lines.append(
                f"| {NAMES[name]} | {status} | session load {_fmt(s.get('session_load_s'), 2)} s "
                f"| peak {_fmt(s.get('peak_rss_mb'))} MB | same file as the appliance |"
            )
            continue
        status = s["status"] if s["status"] == "ok" else f"{s['status']}: {s.get('reason', '')}"
        if s.get("setup_s") is not None:
            status += f" (venv set-up: {s['setup_s']}{' s' if s['setup_s'] != 'cached' else ''})"
        fid = s.get("fidelity_vs_fp32")
        lines.append(
            f"| {NAMES[name]} | {status} | {_fmt(s.get('startup_s'), 2)} s | "
            f"{_fmt(s.get('ready_rss_mb'), 0)} / {_fmt(s.get('idle_rss_mb'), 0)} / "
            f"{_fmt(s.get('peak_rss_mb'), 0)} MB | "
            + (f"{fid['mean_cosine']:.4f} / {fid['min_cosine']:.4f}" if fid else "–")
            + " |"
        )
    lines += [
        "",
        "## Throughput and latency",
        "",
        "CPU is the server's process tree, in % of one core (this machine has "
        f"{m['cores']}); load gen. is the load generator's own CPU.",
        "",
        "| shape | c | system | req/s | texts/s | tokens/s | p50 ms | p95 ms | p99 ms | errors "
        "| CPU % | load gen. CPU % | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {n: i for i, n in enumerate(NAMES)}
    shape_order = {s["name"]: i for i, s in enumerate(result["shapes"])}
    for p in sorted(
        result["points"],
        key=lambda p: (shape_order.get(p["shape"], 9), p["concurrency"], order[p["system"]]),
    ):
        if "skipped" in p:
            lines.append(
                f"| {p['shape']} | {p['concurrency']} | {p['system']} | skipped: {p['skipped']} "
                "| | | | | | | | | |"
            )
            continue
        lines.append(
            f"| {p['shape']} | {p['concurrency']} | {p['system']} | {_fmt(p['requests_per_s'])} | "
            f"{_fmt(p['texts_per_s'])} | {_fmt(p['tokens_per_s'], 0)} | {_fmt(p['p50_ms'])} | "
            f"{_fmt(p['p95_ms'])} | {_fmt(p['p99_ms'])} | {p['errors']} | "
            f"{_fmt(p['cpu_pct'], 0)} | {_fmt(p['loadgen_cpu_pct'], 0)} | "
            f"{_fmt(p['peak_rss_mb'], 0)} |"
        )
    if result["ratios"]:
        lines += [
            "",
            "## Appliance / other systems",
            "",
            "Throughput ratio (texts/s, higher is better for the appliance) and p99 ratio "
            "(lower is better).",
            "",
            "| shape | c | vs PyTorch: throughput | p99 | vs infinity: throughput | p99 | "
            "share of engine ceiling |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in sorted(
            result["ratios"], key=lambda r: (shape_order.get(r["shape"], 9), r["concurrency"])
        ):
            lines.append(
                f"| {r['shape']} | {r['concurrency']} | "
                f"{_fmt(r.get('vs_torch_throughput'), 2)}x | {_fmt(r.get('vs_torch_p99'), 2)}x | "
                f"{_fmt(r.get('vs_infinity_throughput'), 2)}x | "
                f"{_fmt(r.get('vs_infinity_p99'), 2)}x | "
                + (f"{r['vs_engine_ceiling']:.0%}" if "vs_engine_ceiling" in r else "–")
                + " |"
            )
    engine = result["systems"].get("engine", {})
    if engine.get("points"):
        lines += [
            "",
            "## Raw engine ceiling (INT8 session in-process, no HTTP, ideal batches)",
            "",
            "One call at a time with every core on it, and one call per core at once (the "
            "appliance's default for encoders); the best row per text length is the ceiling.",
            "",
            "| texts | batch | way | tokens/text | texts/s | ms per call |",
            "|---|---|---|---|---|---|",
        ]
        for p in engine["points"]:
            lines.append(
                f"| {p['length']} | {p['batch']} | {p.get('way', '')} | {p['tokens_per_text']:g} | "
                f"{_fmt(p['texts_per_s'])} | {p['ms_per_call']:.2f} |"
            )
        if engine.get("runner"):
            lines += [
                "",
                "The runner's model call (`EmbeddingRunner.infer`: pad, run, pool) on unsorted "
                "merged batches of 32, as the micro-batcher hands them over: one call per batch "
                "(the default) against run_session's length buckets and per-call token budget "
                "(PAD_WASTE_TOKENS=256, CALL_TOKENS=1024; off by default, see "
                "appliance/tasks/base.py), alternately in one process.",
                "",
                "| texts | tokens/text | one call: texts/s | buckets: texts/s | gain |",
                "|---|---|---|---|---|",
            ]
            for r in engine["runner"]:
                lines.append(
                    f"| {r['texts']} | {r['tokens_per_text']:g} | "
                    f"{_fmt(r['one_call_texts_per_s'])} | {_fmt(r['buckets_texts_per_s'])} | "
                    f"{r['gain']:.2f}x |"
                )
    lines += _batch_run_section(result.get("batch_run"))
    lines += _cluster_section(result.get("cluster"))
    sizes = result.get("sizes", {})
    lines += ["", "## Other measurements", ""]
    if "serving_venv_mb" in sizes:
        lines.append(
            "- Installed size: a fresh serving venv (`pip install .`) "
            f"{sizes['serving_venv_mb']:.0f} MB (torch in it: "
            f"{'yes' if sizes.get('serving_has_torch') else 'no'}; installed in "
            f"{sizes['serving_install_s']:.0f} s); the export venv "
            f"{sizes.get('export_venv_mb', 0):.0f} MB ({sizes.get('export_venv', '')})."
        )
    else:
        lines.append(
            "- Installed size: not measured "
            f"({sizes.get('skipped') or sizes.get('serving_skipped')})."
        )
    cache = result["systems"].get("appliance", {}).get("cache")
    if cache:
        lines.append(
            f"- Cache: the same request twice, {cache['requests']} times: hit p50 "
            f"{cache['hit_p50_ms']:.2f} ms (p95 {cache['hit_p95_ms']:.2f}), miss p50 "
            f"{cache['miss_p50_ms']:.2f} ms, client-side over a kept-alive connection."
        )
    path = result["systems"].get("appliance", {}).get("request_path")
    if path:
        lines.append(
            f"- Request path: one cached text over and over at c={path['concurrency']}: "
            f"{path['requests_per_s']:.0f} requests/s, {path['server_cpu_us_per_request']:.0f} us "
            f"of server CPU per request (all its threads), p50 {path['p50_ms']:.2f} ms, p99 "
            f"{path['p99_ms']:.2f} ms; wrk used {path['loadgen_cpu_pct']:.0f}% of a core."
        )
    if result.get("fidelity_skipped"):
        lines.append(f"- Fidelity: not measured ({result['fidelity_skipped']}).")
    else:
        lines.append(
            "- Fidelity: cosine between each system's served vectors and PyTorch fp32 "
            f"(transformers, mean pooling) over {result.get('fidelity_sentences')} fixed "
            "sentences (benchmarks/texts.py), in the Systems table."
        )
    skipped = [p for p in result["points"] if "skipped" in p]
    if skipped:
        lines.append(
            f"- {len(skipped)} points were skipped because one round of requests would outlast "
            "the point (the system is too slow for that load in this run's time); the table "
            "says so."
        )
    lines.append("")
    return "\n".join(lines)


def chart(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shapes = [s["name"] for s in result["shapes"]]
    cols = 2 if len(shapes) > 1 else 1
    rows = (len(shapes) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(10, 3.4 * rows), squeeze=False)
    for ax, shape in zip(axes.flat, shapes, strict=False):
        for system in ("appliance", "torch", "infinity"):
            pts = sorted(
                (p["concurrency"], p["texts_per_s"])
                for p in result["points"]
                if p["system"] == system and p["shape"] == shape and "skipped" not in p
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=NAMES[system])
        length = next(s["length"] for s in result["shapes"] if s["name"] == shape)
        ceiling = _engine_ceiling(result, length)
        if ceiling:
            ax.axhline(ceiling, linestyle="--", color="grey", label="raw engine ceiling")
        ax.set_xscale("log", base=2)
        levels = result["settings"]["concurrency"]
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.minorticks_off()
        ax.set_title(shape)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("texts/s")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    for ax in list(axes.flat)[len(shapes) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{result['model']['name']}, {result['started_at']} (texts/s; higher is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return True


def write(result: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "result.json", out / "result.md"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    paths[1].write_text(markdown(result))
    if chart(result, out / "result.png"):
        paths.append(out / "result.png")
    else:
        result["chart_skipped"] = "matplotlib is not installed (pip install '.[bench]')"
    return paths


def _batch_run_section(run: dict[str, Any] | None) -> list[str]:
    if not run:
        return []
    head = ["", "## `appliance batch run`: in-process and on Ray Data", ""]
    if "skipped" in run:
        return [*head, f"Not measured: {run['skipped']}"]
    local, ray = run["in_process"], run["ray"]
    rows = [
        *head,
        f"{run['lines']} short texts to {run['endpoint']} on {run['cpus']} CPUs, the same file "
        "both ways; Ray: a local cluster, one actor per CPU (one session stream each).",
        "",
        "| runner | lines/s | seconds | failed lines |",
        "|---|---|---|---|",
        f"| in-process | {_fmt(local['lines_per_s'])} | {local['seconds']} | {local['failed']} |",
    ]
    if "skipped" in ray:
        return [*rows, "", f"Ray not measured: {ray['skipped']}"]
    return [
        *rows,
        f"| Ray Data, {ray['actors']} actors | {_fmt(ray['lines_per_s'])} | {ray['seconds']} "
        f"(+ {ray['init_s']} s ray.init) | {ray['failed']} |",
        "",
        f"Ray vs in-process: {ray['vs_in_process']:.2f}x on this machine.",
    ]


def _calls(calls: dict[str, float] | None) -> str:
    if not calls:
        return "-"
    return ", ".join(f"{c} {n:g}" for c, n in calls.items() if n)


def _cluster_section(run: dict[str, Any] | None) -> list[str]:
    if not run:
        return []
    head = ["", "## Cluster mode against a single box", ""]
    if "skipped" in run:
        return [*head, f"Not measured: {run['skipped']}"]
    rows = [
        *head,
        f"One replica on a real PostgreSQL and Redis (on this machine) against the same server "
        f"as a single box: short texts, one per request, c={run['concurrency']}, "
        f"{run['seconds_per_run']} s per run, in alternating rounds with both servers up (the "
        "medians count).",
        "",
        "| system | requests/s | p50 ms | p99 ms | server CPU (cores) | backends CPU (cores) "
        "| Redis commands / request | PostgreSQL rows / request |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, points in run["runs"].items():
        for p in points:
            rows.append(
                f"| {name} | {_fmt(p['requests_per_s'])} | {p['p50_ms']} | {p['p99_ms']} | "
                f"{p['cpu_cores']} | {p.get('backends_cpu_cores', '-')} | "
                f"{_calls(p.get('redis_commands_per_request'))} | "
                f"{p.get('postgres_rows_per_request', '-')} |"
            )
    return [
        *rows,
        "",
        f"Cluster vs single box: {run['cluster_vs_single']:.2f}x (goal >= 0.85). One limit "
        f"decision (a Lua script round trip) costs {run['limit_script_round_trip_us']} us "
        "from a client on this machine.",
    ]


def console_summary(result: dict[str, Any]) -> str:
    lines = ["", "targets:"]
    for t in result["targets"]:
        lines.append(f"  [{t['status']:^12}] {t['target']}: {t['figure']}")
    lines.append(f"total time {result['total_s']:.0f} s")
    return "\n".join(lines)
