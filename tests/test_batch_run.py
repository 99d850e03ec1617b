"""`appliance batch run`: a file answered without a server, in this process and on a local Ray
(Ray Data, an actor pool), with the batch jobs' work functions: the same result lines as the
server's job runner, in input order, bad lines answered with their errors."""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient
from typer.testing import CliRunner

from appliance.cli import app
from appliance.jobs.offline import RunSpec, ndjson_ranges, read_lines, run_in_process, run_on_ray
from tests.conftest import make_settings
from tests.test_jobs import close, new_key, run

LABELS = ["billing", "bug", "praise"]
VOLATILE = {"latency_ms"}


def mixed_lines(n: int, seed: int = 7) -> bytes:
    """Mostly good classify bodies, with blank lines, bad JSON, wrong shapes, CRLF endings, a
    U+2028 inside a string (a line break to str.splitlines, not to NDJSON) and over-long lines."""
    rng = random.Random(seed)
    out: list[bytes] = []
    for i in range(n):
        roll = rng.random()
        if roll < 0.03:
            out.append(b"")
        elif roll < 0.05:
            out.append(b"{not json")
        elif roll < 0.07:
            out.append(b'{"text": 5}')
        elif roll < 0.08:
            out.append(b'{"text": "' + b"x" * 5000 + b'"}')  # over max_body_bytes below
        elif roll < 0.10:
            out.append(json.dumps({"text": f"line {i}\u2028two", "labels": LABELS}).encode())
        else:
            words = " ".join(
                rng.choice(["refund", "crash", "great", "invoice", "bug"])
                for _ in range(rng.randint(1, 12))
            )
            end = b"\r" if roll > 0.97 else b""
            out.append(json.dumps({"text": f"{words} {i}", "labels": LABELS}).encode() + end)
    return b"\n".join(out) + b"\n"


def steady(lines: list[bytes]) -> list[dict[str, Any]]:
    """Result lines without what cannot repeat between runs (timings)."""
    rows = [json.loads(line) for line in lines]
    for row in rows:
        for field in VOLATILE:
            (row.get("response") or {}).pop(field, None)
    return rows


def agree(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The same answer, floats within 5e-3 (INT8 activations are quantised per model call, so
    an answer moves a little with what it was batched with). With random weights two labels
    can tie within that: then the label may differ, but only between the tied ones."""
    if close(a, b):
        return True
    ra, rb = a.get("response") or {}, b.get("response") or {}
    if "scores" not in ra or "scores" not in rb:
        return False
    rest = [{k: v for k, v in r.items() if k not in ("label", "confidence")} for r in (ra, rb)]
    return (
        close({**a, "response": None}, {**b, "response": None})
        and close(*rest)
        and abs(ra["scores"][rb["label"]] - rb["confidence"]) < 5e-3
        and abs(rb["scores"][ra["label"]] - ra["confidence"]) < 5e-3
    )


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    import ray  # the ray extra is part of dev: a missing ray fails here, it does not skip

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_byte_ranges_give_every_line_once_in_order(tmp_path: Path) -> None:
    """However the file is cut, the ranges' rows together are the file's lines, in order: a line
    belongs to the range it starts in; a line over the limit is one None row."""
    body = mixed_lines(400)
    path = tmp_path / "in.ndjson"
    path.write_bytes(body + b"tail without newline")
    with open(path, "rb") as fh:
        whole = list(read_lines(fh, 4096))
    assert whole[-1] == b"tail without newline" and None in whole
    assert len(whole) == body.count(b"\n") + 1
    for range_bytes in (1, 97, 4096, 10_000, len(body) * 2):
        source = ndjson_ranges(path, 4096, range_bytes)
        rows: list[bytes | None] = []
        for task in source.get_read_tasks(64):
            for table in task():
                rows.extend(table.column("raw").to_pylist())
        assert rows == whole, range_bytes


def test_in_process_run_answers_like_the_servers_job_runner(
    client: TestClient, tmp_path: Path, models_dir: Path
) -> None:
    body = mixed_lines(300, seed=3)
    key = new_key(client)
    _, job_rows = run(client, key, body, "/v1/classify", model="tiny-embed")
    path = tmp_path / "in.ndjson"
    path.write_bytes(body)
    settings = make_settings(tmp_path / "data", models_dir, APPLIANCE_SERVER__MAX_BODY_BYTES="4096")
    server_settings = make_settings(client.data_dir, models_dir)  # type: ignore[attr-defined]
    assert server_settings.server.max_body_bytes > 4096  # the job ran with the default limit
    out = tmp_path / "out.ndjson"
    with open(out, "wb") as sink:
        summary = run_in_process(path, sink, RunSpec(settings, "/v1/classify", "tiny-embed"), None)
    mine = steady(out.read_bytes().splitlines())
    theirs = [dict(r) for r in job_rows]
    for row in theirs:
        (row.get("response") or {}).pop("latency_ms", None)
    assert [r["line"] for r in mine] == [r["line"] for r in theirs]
    assert summary.lines == len(mine) and summary.failed == sum(r["status"] >= 400 for r in mine)
    for a, b in zip(mine, theirs, strict=True):
        if a["status"] == 200:
            assert agree(a, b), (a, b)
        elif a["status"] != 413:  # the server's limit is larger: it answered the long lines
            a["error"].pop("request_id"), b["error"].pop("request_id")
            assert a == b
    assert {r["status"] for r in mine} >= {200, 400, 413, 422}


def test_ray_run_equals_the_in_process_run_line_for_line(
    ray_local: None, tmp_path: Path, models_dir: Path
) -> None:
    body = mixed_lines(3000, seed=11)
    path = tmp_path / "in.ndjson"
    path.write_bytes(body)
    settings = make_settings(tmp_path / "data", models_dir, APPLIANCE_SERVER__MAX_BODY_BYTES="4096")
    spec = RunSpec(settings, "/v1/classify", "tiny-embed")
    local, spread = tmp_path / "local.ndjson", tmp_path / "ray.ndjson"
    with open(local, "wb") as sink:
        reference = run_in_process(path, sink, spec, None)
    with open(spread, "wb") as sink:
        summary = run_on_ray(
            path, sink, spec, None, address="local", actors=2, range_bytes=len(body) // 5
        )
    spread_rows = steady(spread.read_bytes().splitlines())
    local_rows = steady(local.read_bytes().splitlines())
    assert [r["line"] for r in spread_rows] == [r["line"] for r in local_rows]
    for a, b in zip(spread_rows, local_rows, strict=True):
        assert agree(a, b), (a, b)
    assert (summary.lines, summary.failed, summary.tokens) == (
        reference.lines,
        reference.failed,
        reference.tokens,
    )
    assert summary.lines > 2800 and 0 < summary.failed < 400


def test_cli_runs_as_a_key_records_usage_and_stops_when_the_quota_is_spent(
    tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance.gateway.keys import KeyStore

    settings = make_settings(tmp_path / "data", models_dir)
    config = tmp_path / "data" / "config.toml"
    config.write_text(f'data_dir = "{settings.data_dir}"\nmodels_dir = "{models_dir}"\n')
    keys = KeyStore(settings.keys_path)
    _, secret = keys.create("runner", ["jobs"], token_quota=600)
    path, out = tmp_path / "in.ndjson", tmp_path / "out.ndjson"
    path.write_bytes(b"".join(b'{"text": "invoice number %d is wrong"}\n' % i for i in range(1000)))
    args = ["batch", "run", str(path), "--endpoint", "/v1/text-vectorisation", "--out", str(out)]
    args += ["--model", "tiny-embed", "--config", str(config), "--key", secret]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    report = json.loads(result.stderr.strip().splitlines()[-1])
    assert report["stopped"]["code"] == "INSUFFICIENT_BALANCE"
    written = out.read_bytes().splitlines()
    assert 0 < len(written) < 1000 and report["lines"] == len(written)  # stopped after a block
    assert [json.loads(w)["line"] for w in written] == list(range(1, len(written) + 1))
    with sqlite3.connect(settings.usage_path) as db:
        (tokens,) = db.execute(
            "SELECT SUM(tokens) FROM requests WHERE endpoint LIKE 'RUN %'"
        ).fetchone()
        (spent,) = db.execute("SELECT tokens FROM spend").fetchone()
    assert tokens == report["tokens"] == spent > 600

    # A key without the jobs scope, or a wrong one, runs nothing.
    _, other = keys.create("reader", ["predict"])
    for bad in (other, "sk-nope"):
        result = CliRunner().invoke(app, [*args[:-1], bad])
        assert result.exit_code == 1 and "jobs scope" in result.output


def test_cli_refuses_an_unknown_endpoint(tmp_path: Path) -> None:
    path = tmp_path / "in.ndjson"
    path.write_bytes(b"{}\n")
    result = CliRunner().invoke(
        app, ["batch", "run", str(path), "--endpoint", "/v1/nope", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1 and "unknown endpoint" in result.output


def test_the_key_runs_only_its_models(tmp_path: Path, models_dir: Path) -> None:
    """As for a job: a line naming a model outside the key's allowlist is answered 403."""
    from appliance.gateway.keys import KeyStore

    settings = make_settings(tmp_path / "data", models_dir)
    store = KeyStore(settings.keys_path)
    key, _ = store.create("narrow", ["jobs"], models=["tiny-embed"])
    path = tmp_path / "in.ndjson"
    path.write_bytes(
        b'{"text": "hi", "model": "tiny-cls"}\n{"text": "hi", "model": "tiny-embed"}\n'
    )
    out = tmp_path / "out.ndjson"
    with open(out, "wb") as sink:
        run_in_process(path, sink, RunSpec(settings, "/v1/text-vectorisation", key=key), None)
    rows = [json.loads(line) for line in out.read_bytes().splitlines()]
    assert [r["status"] for r in rows] == [403, 200]


def test_bench_section_measures_both_runners(ray_local: None, models_dir: Path) -> None:
    """`appliance bench`'s batch-run section: real figures for both ways, on one file."""
    from benchmarks.batch_run import measure
    from benchmarks.report import _batch_run_section

    result = measure(models_dir, "tiny-embed", 600)
    assert result["in_process"]["failed"] == result["ray"]["failed"] == 0
    assert result["in_process"]["lines_per_s"] > 0 and result["ray"]["lines_per_s"] > 0
    text = "\n".join(_batch_run_section(result))
    assert "| in-process |" in text and "Ray vs in-process" in text


def test_the_kuberay_example_runs_this_command_on_pinned_images() -> None:
    """deploy/ray/rayjob.yaml: its entrypoint is a valid `appliance batch run --ray auto` line
    (every option one the command has), images pinned, every node mounting the same paths."""
    import shlex

    import typer.main
    import yaml

    root = Path(__file__).resolve().parent.parent
    job = yaml.safe_load((root / "deploy" / "ray" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["appliance", "batch", "run"] and argv[argv.index("--ray") + 1] == "auto"
    command = typer.main.get_command(app).commands["batch"].commands["run"]  # type: ignore[attr-defined]
    known = {opt for p in command.params for opt in p.opts}
    assert {a for a in argv if a.startswith("--")} <= known
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster["workerGroupSpecs"]
    ]
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"]:
            image = c["image"]
            assert ":" in image and not image.endswith(":latest")
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert {"/models", "/jobs"} <= mounts
    assert 'ARG EXTRAS=""' in (root / "Containerfile").read_text()
