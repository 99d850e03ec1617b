"""`appliance bench` in miniature: the harness on a tiny model (the appliance only, plus the
raw engine ceiling), a few seconds of load from the async client, the files it writes. And
the length buckets of TextEncoderRunner.run_session (the engine work the benchmark measures)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("psutil")  # the bench extra's (the export extra brings it too)

from appliance.config import RuntimeConfig
from appliance.models.manifest import read_manifest
from appliance.runtime.session import create_session, usable_cores
from appliance.tasks import build_runner


@pytest.fixture
def embed_only(models_dir: Path, tmp_path: Path) -> Path:
    """tiny-embed alone, its manifest pointing at no checkpoint: no PyTorch system can run."""
    out = tmp_path / "models"
    shutil.copytree(models_dir / "tiny-embed", out / "tiny-embed")
    manifest = out / "tiny-embed" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "source": ""}))
    return out


def test_bench_harness_writes_sane_results(embed_only: Path, tmp_path: Path) -> None:
    from benchmarks.run import Options, run_bench

    messages: list[str] = []
    result = run_bench(
        Options(
            systems=("appliance", "engine"),
            quick=True,
            out=tmp_path / "results",
            work=tmp_path / "work",
            models_dir=embed_only,
            model="tiny-embed",
            loadgen="httpx",
            duration=1.0,
            concurrency=(1, 4),
            shapes=("short-single", "short-batch"),
            command="appliance bench --test",
            log=messages.append,
        )
    )
    out = tmp_path / "results"
    saved = json.loads((out / "result.json").read_text())
    assert saved["command"] == "appliance bench --test"
    assert saved["loadgen"]["tool"] == "httpx"
    assert saved["systems"]["appliance"]["status"] == "ok", saved["systems"]["appliance"]
    assert saved["systems"]["engine"]["status"] == "ok", saved["systems"]["engine"]
    appliance = saved["systems"]["appliance"]
    assert appliance["startup_s"] > 0 and appliance["idle_rss_mb"] > 20
    assert appliance["dimension"] == read_manifest(embed_only / "tiny-embed").dimension
    assert appliance["cache"]["hits_confirmed"] == appliance["cache"]["requests"]
    points = [p for p in saved["points"] if "skipped" not in p]
    assert {(p["shape"], p["concurrency"]) for p in points} == {
        ("short-single", 1),
        ("short-single", 4),
        ("short-batch", 1),
        ("short-batch", 4),
    }
    for p in points:
        assert p["requests"] > 0 and p["errors"] == 0, p
        assert p["texts_per_s"] == pytest.approx(
            p["requests_per_s"] * p["texts_per_request"], rel=0.02
        )
        assert 0 < p["p50_ms"] <= p["p95_ms"] <= p["p99_ms"] < 30_000
        assert p["peak_rss_mb"] > 20 and p["cpu_pct"] > 0
    engine = saved["systems"]["engine"]
    assert all(p["texts_per_s"] > 0 for p in engine["points"])
    assert {t["status"] for t in saved["targets"]} <= {"met", "not met", "not measured"}
    assert len(saved["targets"]) == 9  # eight single-box targets and cluster mode
    # The request path: every answer after the first a cache hit, its CPU cost measured.
    path = appliance["request_path"]
    assert path["requests"] > 0 and path["errors"] == 0, path
    assert path["requests_per_s"] > 0 and path["server_cpu_us_per_request"] > 0
    assert "Request path: one cached text" in (out / "result.md").read_text()
    md = (out / "result.md").read_text()
    assert "appliance bench --test" in md and "| short-single | 4 | appliance |" in md
    assert "## Targets" in md and "## Raw engine ceiling" in md
    assert result["total_s"] < 120


def test_a_system_that_cannot_be_set_up_is_reported_skipped(
    embed_only: Path, tmp_path: Path
) -> None:
    from benchmarks.run import Options, run_bench

    result = run_bench(
        Options(
            systems=("torch",),
            quick=True,
            out=tmp_path / "results",
            work=tmp_path / "work",
            models_dir=embed_only,
            model="tiny-embed",
            loadgen="httpx",
            log=lambda _: None,
        )
    )
    torch = result["systems"]["torch"]
    assert torch["status"] == "skipped" and "checkpoint" in torch["reason"]
    md = (tmp_path / "results" / "result.md").read_text()
    assert "skipped: RuntimeError: no PyTorch checkpoint" in md


@pytest.mark.parametrize("slug", ["tiny-embed", "tiny-cls"])
def test_length_buckets_keep_order_and_results(models_dir: Path, slug: str) -> None:
    folder = models_dir / slug
    manifest = read_manifest(folder)
    runner = build_runner(folder, manifest, create_session(folder / "model.onnx", RuntimeConfig()))
    rng = random.Random(0)
    words = "spam ham free offer click here win money meeting tomorrow report".split()  # noqa: SIM905
    texts = [" ".join(rng.choices(words, k=rng.choice([1, 2, 30, 50]))) for _ in range(24)]
    items = runner.preprocess([runner.parse_input({"text": t}) for t in texts])
    one_call = runner.infer(items)  # the default: one call
    runner.PAD_WASTE_TOKENS = 8  # type: ignore[misc]  # many buckets
    runner.CALL_TOKENS = 200  # type: ignore[misc]
    encodings = [e for item in items for e in getattr(item, "encodings", [])] or [
        item.encoded for item in items
    ]
    outputs, mask = runner.run_session(encodings)
    assert mask.shape == (len(texts), max(e.n_tokens for e in encodings))
    assert (mask.sum(axis=1) == [e.n_tokens for e in encodings]).all()
    bucketed = runner.infer(items)
    for a, b in zip(one_call, bucketed, strict=True):
        a, b = np.ravel(a), np.ravel(b)
        cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        assert cos > 0.99  # dynamic INT8 scales see the padding: close, not bit-equal


def test_usable_cores_honours_a_cgroup_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert usable_cores(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cores(tmp_path) >= 1
