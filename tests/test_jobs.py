"""Async batch jobs (API.md "Async jobs"): upload, start, poll, results, delete; bad lines;
limits and access; usage; priority over real-time requests; durability across a graceful
restart and a kill -9; memory while a 1 GB upload streams in; the `appliance batch` CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from litestar.testing import TestClient
from typer.testing import CliRunner

from appliance.jobs.store import JobState, LineCounter, LineReader
from appliance.runtime.batcher import BACKGROUND, REALTIME, Batcher
from tests.test_imports import free_port

NDJSON = {"Content-Type": "application/x-ndjson"}
LABELS = ["billing", "bug", "praise"]
FINISHED = ("completed", "failed", "cancelled")


# ---- helpers ---------------------------------------------------------------------------------
def ndjson(rows: list[Any]) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def texts(n: int, prefix: str = "text") -> bytes:
    """n short text-vectorisation bodies."""
    return b"".join(b'{"text": "%s number %d"}\n' % (prefix.encode(), i) for i in range(n))


def auth(key: str) -> dict[str, str]:
    return {"x-api-key": key}


def new_key(client: TestClient, scopes: list[str] | None = None, **limits: Any) -> str:
    return client.keys.create("jobs", scopes or ["jobs", "predict"], **limits)[1]  # type: ignore[attr-defined]


def create(
    client: TestClient, key: str, body: bytes, endpoint: str, **params: str
) -> dict[str, Any]:
    r = client.post(
        "/v1/batch",
        params={"endpoint": endpoint, **params},
        content=body,
        headers={**auth(key), **NDJSON},
    )
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def start(client: TestClient, key: str, job_id: str) -> dict[str, Any]:
    r = client.post(f"/v1/batch/{job_id}/start", headers=auth(key))
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def status(client: TestClient, key: str, job_id: str) -> dict[str, Any]:
    r = client.get(f"/v1/batch/{job_id}", headers=auth(key))
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def wait(
    client: TestClient,
    key: str,
    job_id: str,
    until: Callable[[dict[str, Any]], bool] = lambda job: job["status"] in FINISHED,
    timeout: float = 120,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = status(client, key, job_id)
        if until(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never got there: {job}")


def results(client: TestClient, key: str, job_id: str) -> list[dict[str, Any]]:
    r = client.get(f"/v1/batch/{job_id}/results", headers=auth(key))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in r.text.splitlines()]


def run(
    client: TestClient, key: str, body: bytes, endpoint: str, **params: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    job = create(client, key, body, endpoint, **params)
    assert job["status"] == "created"
    start(client, key, job["id"])
    done = wait(client, key, job["id"])
    return done, results(client, key, job["id"])


def same_answer(job_answer: dict[str, Any], live: dict[str, Any]) -> None:
    """A job line answers what the real-time endpoint answers (timings and cache aside)."""
    volatile = {"latency_ms", "tokens", "cached"}
    assert set(job_answer) == set(live)
    for field in set(live) - volatile:
        assert close(job_answer[field], live[field]), (field, job_answer, live)


# ---- results of each endpoint ------------------------------------------------------------------
def test_classify_job_answers_each_line_like_the_endpoint(client: TestClient) -> None:
    key = new_key(client)
    rows = [
        {"text": "my invoice is wrong", "labels": LABELS},
        {"text": "the app crashes on start", "labels": LABELS, "threshold": 0.9},
        {"text": "great work, thanks", "labels": ["good", "bad"]},
    ]
    job, out = run(client, key, ndjson(rows), "/v1/classify", model="tiny-embed")
    assert job["status"] == "completed" and job["total"] == job["done"] == 3
    assert job["failed"] == 0 and job["progress"] == 1.0 and job["tokens"] > 0
    assert job["started_at"] and job["finished_at"] and job["endpoint"] == "/v1/classify"
    assert [r["line"] for r in out] == [1, 2, 3] and {r["status"] for r in out} == {200}
    for row, result in zip(rows, out, strict=True):
        live = client.post("/v1/classify", json={**row, "model": "tiny-embed"}, headers=auth(key))
        same_answer(result["response"], live.json())
    assert sum(r["response"]["tokens"] for r in out) == job["tokens"]


def test_job_defaults_from_a_saved_classifier(client: TestClient) -> None:
    key = new_key(client)
    saved = {"name": "triage", "labels": LABELS, "model": "tiny-embed", "threshold": 0.0}
    assert client.post("/v1/classifiers", json=saved, headers=auth(key)).status_code == 201
    rows = [{"text": "refund please"}, {"text": "login fails", "labels": ["a", "b"]}]
    job, out = run(client, key, ndjson(rows), "/v1/tag", classifier="triage")
    assert job["status"] == "completed" and job["classifier"] == "triage", job
    assert list(out[0]["response"]["scores"]) == LABELS  # the classifier's labels
    assert list(out[1]["response"]["scores"]) == ["a", "b"]  # the line's own win
    assert sorted(out[0]["response"]["labels"]) == sorted(LABELS)  # its threshold 0


def close(a: Any, b: Any) -> bool:
    """Equal, floats within 5e-3: INT8 activations are quantised per model call, so an
    answer moves a little with what it was batched with (in real time too)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) < 5e-3
    return bool(a == b)


@pytest.mark.parametrize(
    "endpoint,row,check",
    [
        ("/v1/tag", {"text": "urgent bug in billing", "model": "tiny-tags"}, "scores"),
        ("/v1/text-vectorisation", {"text": "hello", "model": "tiny-embed"}, "vector"),
        ("/text-vectorisation", {"text": ["a", "b"], "model": "tiny-embed"}, "vector"),
        (
            "/v1/text-classification",
            {"text": "hello", "labels": ["x", "y"], "model": "tiny-embed"},
            "probabilities",
        ),
        ("/v1/emotion", {"text": "so happy", "model": "tiny-embed", "threshold": 0.0}, "output"),
        ("/v1/embeddings", {"input": "hello", "model": "tiny-embed"}, "data"),
    ],
)
def test_other_endpoints(client: TestClient, endpoint: str, row: dict, check: str) -> None:
    key = new_key(client)
    job, out = run(client, key, ndjson([row, row]), endpoint)
    assert job["status"] == "completed" and job["failed"] == 0, out
    live = client.post(endpoint, json=row, headers=auth(key)).json()
    for result in out:
        assert result["status"] == 200
        assert result["response"].keys() == live.keys()
        assert close(result["response"][check], live[check]), (result, live)


def test_bad_lines_get_their_own_errors_and_the_job_completes(client: TestClient) -> None:
    key = new_key(client)
    good = json.dumps({"text": "fine", "labels": LABELS}).encode()
    body = b"\n".join(
        [
            good,
            b"this is not json",
            b'{"text": 5, "labels": ["a"]}',  # wrong type
            b'{"text": "", "labels": ["a", "b"]}',  # empty text
            b"",  # blank lines are skipped
            b'["a", "list"]',
            b'{"labels": ["a"]}',  # no text
            b"\r",  # a CRLF file's blank line
            good,  # the last line without a newline
        ]
    )
    job, out = run(client, key, body, "/v1/classify", model="tiny-embed")
    assert job["status"] == "completed" and job["total"] == 7 == job["done"]
    assert job["failed"] == 5 and job["succeeded"] == 2
    assert [(r["line"], r["status"]) for r in out] == [
        (1, 200),
        (2, 400),
        (3, 422),
        (4, 422),
        (6, 422),
        (7, 422),
        (9, 200),
    ]
    errors = {r["line"]: r["error"] for r in out if "error" in r}
    assert errors[2]["code"] == "INVALID_JSON"
    assert errors[3]["message"].startswith("`text`") and errors[3]["details"]["field"] == "text"
    assert errors[4]["message"] == "`text` must not be empty."
    assert errors[6]["message"] == "Expected `object`, got `array`"
    assert errors[7]["message"] == "Send exactly one of `text` and `file`."
    assert all(
        set(e) >= {"error", "code", "message", "details", "request_id"} for e in errors.values()
    )
    assert errors[2]["request_id"] == f"{job['id']}:2"
    # The same body in real time gets the same error.
    live = client.post(
        "/v1/classify",
        json={"text": "", "labels": ["a", "b"], "model": "tiny-embed"},
        headers=auth(key),
    )
    assert live.status_code == 422 and live.json()["message"] == errors[4]["message"]


def test_a_line_over_the_body_limit_is_413_and_the_job_goes_on(serve, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    client = serve(models_dir, APPLIANCE_SERVER__MAX_BODY_BYTES="200")
    key = new_key(client)
    long = json.dumps({"text": "x " * 500}).encode()
    body = b'{"text": "short"}\n' + long + b'\n{"text": "short again"}\n'
    job, out = run(client, key, body, "/v1/text-vectorisation", model="tiny-embed")
    assert job["status"] == "completed"
    assert [r["status"] for r in out] == [200, 413, 200]
    assert out[1]["error"]["code"] == "PAYLOAD_TOO_LARGE"


# ---- creation errors, the upload cap -----------------------------------------------------------
@pytest.mark.parametrize(
    "params,body,status,code",
    [
        ({"endpoint": "/v1/nope"}, b'{"text": "a"}\n', 422, "VALIDATION_ERROR"),
        ({"endpoint": "/v1/keys"}, b'{"name": "a"}\n', 422, "VALIDATION_ERROR"),
        ({}, b'{"text": "a"}\n', 422, "VALIDATION_ERROR"),
        ({"endpoint": "/v1/classify", "model": "no-such-model"}, b"{}\n", 404, "MODEL_NOT_FOUND"),
        ({"endpoint": "/v1/classify", "classifier": "nope"}, b"{}\n", 404, "NOT_FOUND"),
        ({"endpoint": "/v1/text-vectorisation", "classifier": "x"}, b"{}\n", 422, None),
        ({"endpoint": "/v1/classify"}, b"", 422, "VALIDATION_ERROR"),
        ({"endpoint": "/v1/classify"}, b"\n\r\n\n", 422, "VALIDATION_ERROR"),
    ],
    ids=[
        "unknown-endpoint",
        "not-an-inference-endpoint",
        "no-endpoint",
        "unknown-model",
        "unknown-classifier",
        "classifier-on-vectorisation",
        "empty",
        "blank-lines-only",
    ],
)
def test_creation_errors(
    client: TestClient, params: dict, body: bytes, status: int, code: str | None
) -> None:
    key = new_key(client)
    r = client.post("/v1/batch", params=params, content=body, headers={**auth(key), **NDJSON})
    assert r.status_code == status, r.text
    if code:
        assert r.json()["code"] == code
    assert not [p for p in (client.data_dir / "jobs").glob("*")]  # type: ignore[attr-defined]


def test_scope_and_form_uploads(client: TestClient) -> None:
    predict_only = new_key(client, ["predict"])
    r = client.post("/v1/batch", params={"endpoint": "/v1/classify"}, content=b"{}\n",
                    headers={**auth(predict_only), **NDJSON})  # fmt: skip
    assert r.status_code == 403
    key = new_key(client)
    r = client.post(
        "/v1/batch",
        params={"endpoint": "/v1/classify"},
        files={"file": ("a.ndjson", b"{}\n")},
        headers=auth(key),
    )
    assert r.status_code == 400 and "raw request body" in r.json()["message"]


def test_upload_over_the_cap_is_413_and_leaves_nothing(serve, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    client = serve(models_dir, APPLIANCE_JOBS__MAX_UPLOAD_BYTES="1000")
    key = new_key(client)
    body = texts(100)
    assert len(body) > 1000
    url, params = "/v1/batch", {"endpoint": "/v1/text-vectorisation"}
    announced = client.post(url, params=params, content=body, headers={**auth(key), **NDJSON})
    assert announced.status_code == 413, announced.text
    assert announced.json()["code"] == "PAYLOAD_TOO_LARGE"
    assert announced.json()["details"]["max_bytes"] == 1000

    def pieces() -> Iterator[bytes]:  # chunked: no Content-Length, caught while streaming
        for i in range(0, len(body), 100):
            yield body[i : i + 100]

    streamed = client.post(url, params=params, content=pieces(), headers={**auth(key), **NDJSON})
    assert streamed.status_code == 413, streamed.text
    assert list((client.data_dir / "jobs").iterdir()) == []  # type: ignore[attr-defined]
    # Under the cap, the real-time limit (1 MB) does not apply to this route either way.
    assert create(client, key, texts(10), "/v1/text-vectorisation")["total"] == 10


def test_uploads_above_the_real_time_body_limit_are_accepted(client: TestClient) -> None:
    key = new_key(client)
    body = texts(60_000)  # ~1.6 MB, over server.max_body_bytes
    assert len(body) > 1_048_576
    job = create(client, key, body, "/v1/text-vectorisation", model="tiny-embed")
    assert job["total"] == 60_000 and job["input_bytes"] == len(body)
    folder = client.data_dir / "jobs" / job["id"]  # type: ignore[attr-defined]
    assert (folder / "input.ndjson").read_bytes() == body
    assert client.delete(f"/v1/batch/{job['id']}", headers=auth(key)).status_code == 200


# ---- lifecycle: delete, limits, access -------------------------------------------------------
def test_delete_cancels_a_running_job_and_removes_its_files(client: TestClient) -> None:
    key = new_key(client)
    job = create(client, key, texts(30_000), "/v1/text-vectorisation", model="tiny-embed")
    folder = client.data_dir / "jobs" / job["id"]  # type: ignore[attr-defined]
    assert (folder / "state.json").is_file()
    start(client, key, job["id"])
    wait(client, key, job["id"], lambda j: j["done"] > 0)
    r = client.delete(f"/v1/batch/{job['id']}", headers=auth(key))
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cancelled" and r.json()["deleted"] is True
    assert 0 < r.json()["done"] < 30_000
    assert not folder.exists()
    assert client.get(f"/v1/batch/{job['id']}", headers=auth(key)).status_code == 404
    assert client.get("/v1/batch", headers=auth(key)).json()["data"] == []
    assert client.delete(f"/v1/batch/{job['id']}", headers=auth(key)).status_code == 404
    # A created job is deleted the same way; its status says it never ran.
    other = create(client, key, texts(3), "/v1/text-vectorisation")
    gone = client.delete(f"/v1/batch/{other['id']}", headers=auth(key)).json()
    assert gone["status"] == "cancelled" and gone["done"] == 0


def test_409_over_the_running_jobs_limit(serve, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    client = serve(models_dir, APPLIANCE_JOBS__MAX_RUNNING="1")
    key = new_key(client)
    first = create(client, key, texts(30_000), "/v1/text-vectorisation", model="tiny-embed")
    second = create(client, key, texts(5), "/v1/text-vectorisation", model="tiny-embed")
    start(client, key, first["id"])
    r = client.post(f"/v1/batch/{second['id']}/start", headers=auth(key))
    assert r.status_code == 409, r.text
    assert r.json()["code"] == "CONFLICT" and r.json()["details"]["max_running"] == 1
    again = client.post(f"/v1/batch/{first['id']}/start", headers=auth(key))
    assert again.status_code == 409 and again.json()["details"]["status"] == "running"
    assert status(client, key, second["id"])["status"] == "created"
    client.delete(f"/v1/batch/{first['id']}", headers=auth(key))
    start(client, key, second["id"])
    assert wait(client, key, second["id"])["status"] == "completed"
    done = client.post(f"/v1/batch/{second['id']}/start", headers=auth(key))
    assert done.status_code == 409 and done.json()["details"]["status"] == "completed"


def test_429_at_the_21st_job_of_a_key(serve, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    client = serve(models_dir)
    key, other = new_key(client), new_key(client)
    ids = [create(client, key, texts(1), "/v1/text-vectorisation")["id"] for _ in range(20)]
    r = client.post(
        "/v1/batch",
        params={"endpoint": "/v1/text-vectorisation"},
        content=texts(1),
        headers={**auth(key), **NDJSON},
    )
    assert r.status_code == 429, r.text
    assert r.json()["code"] == "TOO_MANY_JOBS"
    assert r.json()["details"] == {"jobs": 20, "max_jobs_per_key": 20}
    assert len(list((client.data_dir / "jobs").iterdir())) == 20  # type: ignore[attr-defined]
    create(client, other, texts(1), "/v1/text-vectorisation")  # another key has its own count
    client.delete(f"/v1/batch/{ids[0]}", headers=auth(key))
    create(client, key, texts(1), "/v1/text-vectorisation")


def test_a_key_byte_budget_refuses_the_upload_that_would_pass_it(serve, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    client = serve(models_dir, APPLIANCE_JOBS__MAX_BYTES_PER_KEY="3000")
    key = new_key(client)
    body = texts(60)
    assert 1500 < len(body) < 3000
    create(client, key, body, "/v1/text-vectorisation")
    url, params = "/v1/batch", {"endpoint": "/v1/text-vectorisation"}
    announced = client.post(url, params=params, content=body, headers={**auth(key), **NDJSON})
    assert announced.status_code == 413, announced.text
    assert announced.json()["code"] == "JOB_STORAGE_EXCEEDED"
    assert announced.json()["details"]["used_bytes"] == len(body)
    assert announced.json()["details"]["max_bytes_per_key"] == 3000

    def pieces() -> Iterator[bytes]:  # chunked: no Content-Length, caught while streaming
        for i in range(0, len(body), 100):
            yield body[i : i + 100]

    streamed = client.post(url, params=params, content=pieces(), headers={**auth(key), **NDJSON})
    assert streamed.status_code == 413 and streamed.json()["code"] == "JOB_STORAGE_EXCEEDED"
    assert len(list((client.data_dir / "jobs").iterdir())) == 1  # type: ignore[attr-defined]
    assert create(client, new_key(client), body, "/v1/text-vectorisation")["total"] == 60


def test_507_when_the_disk_is_nearly_full(serve, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    client = serve(models_dir, APPLIANCE_JOBS__MIN_FREE_BYTES=str(1 << 62))  # > any free space
    key = new_key(client)
    url, params = "/v1/batch", {"endpoint": "/v1/text-vectorisation"}
    r = client.post(url, params=params, content=texts(5), headers={**auth(key), **NDJSON})
    assert r.status_code == 507, r.text
    assert r.json()["code"] == "INSUFFICIENT_STORAGE"
    assert r.json()["details"]["min_free_bytes"] == 1 << 62
    assert not (client.data_dir / "jobs").exists() or not any((client.data_dir / "jobs").iterdir())  # type: ignore[attr-defined]


def test_the_disk_check_runs_while_the_upload_streams_and_leaves_nothing(
    serve,
    models_dir: Path,  # type: ignore[no-untyped-def]
) -> None:
    client = serve(models_dir, APPLIANCE_JOBS__MIN_FREE_BYTES="1000000")
    manager = client.app.dependencies["jobs"].dependency()  # type: ignore[attr-defined]
    # 5 MB free over a 1 MB reserve: room for a small job, not for a 6 MB one whose size
    # (chunked, no Content-Length) is only known as it streams in.
    manager.free_bytes = lambda: 5_000_000
    key = new_key(client)
    small = create(client, key, texts(10), "/v1/text-vectorisation")
    block = texts(40_000)  # ~1.2 MB

    def pieces() -> Iterator[bytes]:
        for _ in range(5):
            yield block

    url, params = "/v1/batch", {"endpoint": "/v1/text-vectorisation"}
    r = client.post(url, params=params, content=pieces(), headers={**auth(key), **NDJSON})
    assert r.status_code == 507, r.text
    assert r.json()["code"] == "INSUFFICIENT_STORAGE"
    assert r.json()["details"] == {"free_bytes": 5_000_000, "min_free_bytes": 1_000_000}
    assert [p.name for p in (client.data_dir / "jobs").iterdir()] == [small["id"]]  # type: ignore[attr-defined]


def test_retention_removes_old_finished_jobs_and_their_files(client: TestClient) -> None:
    from datetime import datetime, timedelta, timezone

    manager = client.app.dependencies["jobs"].dependency()  # type: ignore[attr-defined]
    key = new_key(client)
    done, _ = run(client, key, texts(3), "/v1/text-vectorisation", model="tiny-embed")
    kept = create(client, key, texts(3), "/v1/text-vectorisation")  # never finished: kept
    jobs = client.data_dir / "jobs"  # type: ignore[attr-defined]
    finished = datetime.fromisoformat(done["finished_at"])
    portal = client.blocking_portal  # type: ignore[attr-defined]
    manager.clock = lambda: finished + timedelta(days=6, hours=23)
    assert portal.call(manager.sweep) == []
    assert (jobs / done["id"]).is_dir()
    manager.clock = lambda: finished + timedelta(days=7, seconds=1)
    assert portal.call(manager.sweep) == [done["id"]]
    assert not (jobs / done["id"]).exists()
    assert client.get(f"/v1/batch/{done['id']}", headers=auth(key)).status_code == 404
    manager.clock = lambda: datetime.now(timezone.utc) + timedelta(days=365)
    assert portal.call(manager.sweep) == []
    assert status(client, key, kept["id"])["status"] == "created"


def test_other_keys_cannot_see_or_touch_a_job_but_admin_can(client: TestClient) -> None:
    owner, other = new_key(client), new_key(client)
    admin = new_key(client, ["admin"])
    job = create(client, owner, texts(5), "/v1/text-vectorisation", model="tiny-embed")
    path = f"/v1/batch/{job['id']}"
    for method, url in [
        ("GET", path),
        ("GET", f"{path}/results"),
        ("POST", f"{path}/start"),
        ("DELETE", path),
        ("GET", "/v1/batch/batch_0000000000000000"),
    ]:
        r = client.request(method, url, headers=auth(other))
        assert r.status_code == 404, (method, url, r.text)
        assert r.json()["code"] == "NOT_FOUND"
    assert client.get("/v1/batch", headers=auth(other)).json()["data"] == []
    assert [j["id"] for j in client.get("/v1/batch", headers=auth(owner)).json()["data"]] == [
        job["id"]
    ]
    assert job["id"] in [
        j["id"] for j in client.get("/v1/batch", headers=auth(admin)).json()["data"]
    ]
    start(client, admin, job["id"])
    assert wait(client, admin, job["id"])["status"] == "completed"
    assert len(results(client, admin, job["id"])) == 5
    assert status(client, owner, job["id"])["status"] == "completed"


# ---- while a job runs ------------------------------------------------------------------------
def test_results_are_available_while_running(client: TestClient) -> None:
    key = new_key(client)
    job = create(client, key, texts(30_000), "/v1/text-vectorisation", model="tiny-embed")
    start(client, key, job["id"])
    seen = wait(client, key, job["id"], lambda j: j["done"] >= 256)
    partial = results(client, key, job["id"])
    assert len(partial) >= seen["done"]
    assert [r["line"] for r in partial] == list(range(1, len(partial) + 1))
    view = status(client, key, job["id"])
    assert view["status"] == "running" and len(partial) < 30_000
    assert view["eta_seconds"] is not None and 0 < view["progress"] < 1
    client.delete(f"/v1/batch/{job['id']}", headers=auth(key))


def test_a_real_time_request_during_a_job_answers_promptly(client: TestClient) -> None:
    key = new_key(client)
    job = create(client, key, texts(30_000), "/v1/text-vectorisation", model="tiny-embed")
    start(client, key, job["id"])
    before = wait(client, key, job["id"], lambda j: j["done"] >= 128)["done"]
    latencies = []
    for i in range(20):
        began = time.perf_counter()
        r = client.post(
            "/v1/text-vectorisation",
            json={"text": f"real time {i}", "model": "tiny-embed"},
            headers={**auth(key), "Cache-Control": "no-store"},
        )
        latencies.append(time.perf_counter() - began)
        assert r.status_code == 200
    during = status(client, key, job["id"])
    assert during["status"] == "running" and during["done"] > before  # the job really ran
    print(
        f"real-time latency during a job: median {statistics.median(latencies) * 1000:.1f} ms, "
        f"max {max(latencies) * 1000:.1f} ms"
    )
    assert statistics.median(latencies) < 0.5 and max(latencies) < 3
    client.delete(f"/v1/batch/{job['id']}", headers=auth(key))


def test_job_tokens_count_in_usage_and_balance(client: TestClient) -> None:
    key = new_key(client, token_quota=1_000_000)
    rows = [{"text": f"message {i} about billing", "labels": LABELS} for i in range(40)]
    job, _ = run(client, key, ndjson(rows), "/v1/classify", model="tiny-embed")
    assert job["status"] == "completed" and job["tokens"] > 0
    balance = client.get("/v1/balance", headers=auth(key)).json()
    assert balance["spent"] == job["tokens"]
    assert balance["remaining"] == 1_000_000 - job["tokens"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the usage log is written by a background thread
        usage = client.get("/v1/usage", headers=auth(key)).json()
        if usage["total_tokens"] >= job["tokens"]:
            break
        time.sleep(0.05)
    assert usage["total_tokens"] == job["tokens"]
    assert [row["model"] for row in usage["data"] if row["tokens"]] == ["tiny-embed"]
    logs = client.get("/v1/logs", params={"limit": 1000}, headers=auth(key)).json()["data"]
    assert any(entry["endpoint"] == "JOB /v1/classify" for entry in logs)


def test_a_spent_quota_stops_the_job_and_it_resumes_once_raised(client: TestClient) -> None:
    key_info, key = client.keys.create("q", ["jobs"], token_quota=60)  # type: ignore[attr-defined]
    rows = [{"text": f"message number {i}"} for i in range(200)]
    job = create(client, key, ndjson(rows), "/v1/text-vectorisation", model="tiny-embed")
    start(client, key, job["id"])
    failed = wait(client, key, job["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "INSUFFICIENT_BALANCE"
    assert 0 < failed["done"] < 200
    statuses = {r["status"] for r in results(client, key, job["id"])}
    assert statuses == {200, 402}
    client.keys.update(key_info.id, token_quota=1_000_000)  # type: ignore[attr-defined]
    start(client, key, job["id"])
    done = wait(client, key, job["id"])
    assert done["status"] == "completed" and done["done"] == 200 and done["error"] is None
    out = results(client, key, job["id"])
    assert [r["line"] for r in out] == list(range(1, 201))
    assert {r["status"] for r in out[failed["done"] :]} == {200}


def test_a_revoked_key_fails_its_running_job(client: TestClient) -> None:
    key_info, key = client.keys.create("r", ["jobs"])  # type: ignore[attr-defined]
    admin = new_key(client, ["admin"])
    job = create(client, key, texts(30_000), "/v1/text-vectorisation", model="tiny-embed")
    start(client, key, job["id"])
    wait(client, key, job["id"], lambda j: j["done"] > 0)
    client.keys.revoke(key_info.id)  # type: ignore[attr-defined]
    failed = wait(client, admin, job["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "UNAUTHORIZED"
    assert failed["done"] < 30_000


# ---- durability ------------------------------------------------------------------------------
def check_exactly_once(lines: list[dict[str, Any]], total: int) -> None:
    assert [r["line"] for r in lines] == list(range(1, total + 1))
    assert {r["status"] for r in lines} == {200}


def test_a_graceful_restart_checkpoints_and_resumes(serve, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    client = serve(models_dir)
    key = new_key(client)
    job = create(client, key, texts(8_000), "/v1/text-vectorisation", model="tiny-embed")
    start(client, key, job["id"])
    wait(client, key, job["id"], lambda j: j["done"] >= 500)
    client.__exit__(None, None, None)  # lifespan exit: the worker checkpoints and stops
    state_file = client.data_dir / "jobs" / job["id"] / "state.json"  # type: ignore[attr-defined]
    state = msgspec.json.decode(state_file.read_bytes(), type=JobState)
    assert state.status == "running" and 500 <= state.done < 8_000
    results_file = state_file.with_name("results.ndjson")
    assert results_file.stat().st_size == state.results_bytes  # nothing past the checkpoint

    again = serve(models_dir, data=client.data_dir)
    resumed = status(again, key, job["id"])
    assert resumed["status"] in ("running", "completed") and resumed["done"] >= state.done
    done = wait(again, key, job["id"])
    assert done["status"] == "completed" and done["done"] == 8_000
    check_exactly_once(results(again, key, job["id"]), 8_000)


class LiveServer:
    """`appliance serve` in a subprocess on a data dir, as an operator runs it."""

    def __init__(self, root: Path, models_dir: Path, jobs: str = "", server: str = "") -> None:
        self.root, self.data = root, root / "data"
        self.config = root / "config.toml"
        self.config.write_text(
            f'data_dir = "{self.data}"\nmodels_dir = "{models_dir}"\n'
            f'[server]\nlog_level = "warning"\n{server}\n'
            "[models]\nwatch_interval_seconds = 0\n" + (f"[jobs]\n{jobs}\n" if jobs else "")
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> LiveServer:
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "appliance.cli",
                "serve",
                "--config",
                str(self.config),
                "--port",
                str(self.port),
            ],  # fmt: skip
            stdout=log,
            stderr=log,
            cwd=self.root,
        )
        log.close()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("server did not start")

    @property
    def key(self) -> str:
        return (self.data / "admin.key").read_text().strip()

    @property
    def headers(self) -> dict[str, str]:
        return {"x-api-key": self.key}

    def get(self, path: str) -> dict[str, Any]:
        r = httpx.get(f"{self.url}{path}", headers=self.headers, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def wait(self, job_id: str, until: Callable[[dict[str, Any]], bool], timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.get(f"/v1/batch/{job_id}")
            if until(job):
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} never got there: {job}")

    def memory(self, field: str) -> int:
        """A /proc/<pid>/status figure (VmRSS, VmHWM) in bytes."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(field)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def batch_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", "batch", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_100k_lines_survive_a_kill_9_exactly_once(tmp_path: Path, models_dir: Path) -> None:
    total = 100_000
    server = LiveServer(tmp_path, models_dir).start()
    try:
        source = tmp_path / "lines.ndjson"
        source.write_bytes(texts(total, "short text"))
        submitted = batch_cli(
            "submit", str(source), "--endpoint", "/v1/text-vectorisation", "--model",
            "tiny-embed", "--url", server.url, "--key", server.key,
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip().splitlines()[-1]
        began = time.monotonic()
        server.wait(job_id, lambda j: j["done"] >= total * 0.3, timeout=120)
        server.kill()  # mid-job, mid-chunk: no shutdown, no last checkpoint
        state_file = server.data / "jobs" / job_id / "state.json"
        state = msgspec.json.decode(state_file.read_bytes(), type=JobState)
        assert state.status == "running" and 0 < state.done < total

        server.start()  # the same data dir: the job resumes by itself
        assert server.get(f"/v1/batch/{job_id}")["done"] >= state.done
        done = server.wait(job_id, lambda j: j["status"] in FINISHED, timeout=180)
        took = time.monotonic() - began
        assert done["status"] == "completed" and done["done"] == total, done
        print(f"100k-line job: {took:.1f} s including a kill -9 and a restart")

        out = tmp_path / "out.ndjson"
        fetched = batch_cli("results", job_id, "-o", str(out), "--url", server.url, "--key",
                            server.key)  # fmt: skip
        assert fetched.returncode == 0, fetched.stderr
        numbers = []
        with open(out, "rb") as fh:
            for raw in fh:
                line = msgspec.json.decode(raw)
                assert line["status"] == 200 and len(line["response"]["vector"]) == 32
                numbers.append(line["line"])
        assert numbers == list(range(1, total + 1))  # every line once, in order

        shown = batch_cli("status", job_id, "--url", server.url, "--key", server.key)
        assert json.loads(shown.stdout)["status"] == "completed"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path_factory.mktemp("live"), models_dir).start()
    yield server
    server.stop()


def test_cli_submit_wait_status_and_results(live: LiveServer, tmp_path: Path) -> None:
    source = tmp_path / "in.ndjson"
    source.write_bytes(ndjson([{"text": f"ticket {i}", "labels": LABELS} for i in range(50)]))
    runner = CliRunner()
    from appliance.cli import app

    env = {"APPLIANCE_URL": live.url, "APPLIANCE_KEY": live.key}
    r = runner.invoke(
        app,
        [
            "batch",
            "submit",
            str(source),
            "--endpoint",
            "/v1/classify",
            "--model",
            "tiny-embed",
            "--wait",
        ],  # fmt: skip
        env=env,
    )
    assert r.exit_code == 0, r.output
    job_id = r.stdout.strip().splitlines()[-1]
    shown = json.loads(runner.invoke(app, ["batch", "status", job_id], env=env).stdout)
    assert shown["status"] == "completed" and shown["done"] == 50
    out = runner.invoke(app, ["batch", "results", job_id], env=env)
    assert [json.loads(line)["line"] for line in out.stdout.splitlines()] == list(range(1, 51))
    bad = runner.invoke(app, ["batch", "status", "batch_nope"], env=env)
    assert bad.exit_code == 1 and "404" in bad.output


@pytest.mark.slow
def test_a_1gb_upload_streams_to_disk_in_bounded_memory(live: LiveServer) -> None:
    size = 1 << 30
    line = json.dumps({"text": "lorem ipsum dolor sit amet " * 36, "labels": LABELS}).encode()
    block = (line + b"\n") * ((1 << 20) // (len(line) + 1))
    blocks, rest = divmod(size, len(block))

    def body() -> Iterator[bytes]:  # generated as it is sent: never 1 GB in this process
        for _ in range(blocks):
            yield block
        yield block[:rest]

    tail = block[:rest]
    lines = blocks * block.count(b"\n") + tail.count(b"\n") + bool(tail and tail[-1:] != b"\n")

    idle = live.memory("VmRSS")
    clear_refs = Path(f"/proc/{live.proc.pid}/clear_refs")  # type: ignore[union-attr]
    with contextlib.suppress(OSError):
        clear_refs.write_text("5")  # start the peak (VmHWM) afresh from here
    began = time.monotonic()
    r = httpx.post(
        f"{live.url}/v1/batch",
        params={"endpoint": "/v1/classify", "model": "tiny-embed"},
        content=body(),
        headers={**live.headers, **NDJSON, "Content-Length": str(size)},
        timeout=120,
    )
    took = time.monotonic() - began
    assert r.status_code == 201, r.text
    job = r.json()
    peak = live.memory("VmHWM")
    print(
        f"1 GB upload: {took:.1f} s; idle RSS {idle / 1e6:.0f} MB, peak {peak / 1e6:.0f} MB "
        f"(+{(peak - idle) / 1e6:.0f} MB)"
    )
    assert job["input_bytes"] == size and job["total"] == lines
    assert peak - idle < 200e6
    folder = live.data / "jobs" / job["id"]
    assert (folder / "input.ndjson").stat().st_size == size
    gone = httpx.delete(f"{live.url}/v1/batch/{job['id']}", headers=live.headers, timeout=60)
    assert gone.status_code == 200 and not folder.exists()


# ---- units: priority, line counting and reading ---------------------------------------------
def test_the_batcher_serves_real_time_work_before_background_work() -> None:
    async def main() -> None:
        gate = threading.Event()
        batches: list[list[int]] = []

        def model(items: list[int]) -> list[int]:
            gate.wait(5)
            batches.append(list(items))
            return items

        b: Batcher[int, int] = Batcher(
            model, name="t", max_batch_size=4, max_batch_tokens=1000, max_wait_s=0, max_queue=100
        )
        b.start()
        blocker = asyncio.create_task(b.submit([0], [1]))
        await asyncio.sleep(0.05)  # the model is busy with item 0
        background = asyncio.create_task(
            b.submit([10, 11, 12, 13, 14], [1] * 5, priority=BACKGROUND)
        )
        await asyncio.sleep(0.01)
        realtime = asyncio.create_task(b.submit([1, 2], [1, 1], priority=REALTIME))
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(blocker, background, realtime)
        # Real-time first although queued last; no batch mixes the two.
        assert batches == [[0], [1, 2], [10, 11, 12, 13], [14]]
        await b.stop()

    asyncio.run(main())


@pytest.mark.parametrize("block", [1, 2, 3, 7, 1 << 20])
def test_line_counting_skips_blank_lines_across_block_boundaries(block: int) -> None:
    body = b'{"a": 1}\n\n\r\n  \n{"b": 2}\r\n\n{"c": 3}'
    counter = LineCounter()
    for i in range(0, len(body), block):
        counter.feed(body[i : i + block])
    assert counter.finish() == 4  # the line of spaces counts (and gets an error)


def test_the_line_reader_resumes_at_an_offset_and_skips_long_lines(tmp_path: Path) -> None:
    path = tmp_path / "input.ndjson"
    path.write_bytes(b"one\n\n" + b"x" * 5000 + b"\ntwo\r\n\nthree")
    reader = LineReader(path, 0, 1, max_line_bytes=100)
    first = reader.read(2)
    assert [(line.number, line.raw) for line in first] == [(1, b"one"), (3, None)]
    offset, next_line = reader.offset, reader.next_line
    reader.close()
    again = LineReader(path, offset, next_line, max_line_bytes=100)
    rest = again.read(10)
    assert [(line.number, line.raw) for line in rest] == [(4, b"two\r"), (6, b"three")]
    assert again.read(10) == [] and again.offset == os.path.getsize(path)
    again.close()


def test_resume_drops_result_bytes_written_after_the_checkpoint(tmp_path: Path) -> None:
    from appliance.jobs.store import JobStore

    store = JobStore(tmp_path / "jobs")
    upload = store.begin_upload("batch_x")
    upload.write(b"a\nb\nc\n")
    state = JobState(
        id="batch_x", key_id="k", endpoint="/v1/classify", created_at="now", total=3,
        input_bytes=6,
    )  # fmt: skip
    upload.finish(state)
    reader, results = store.resume(state, max_line_bytes=100)
    [first] = reader.read(1)
    done = msgspec.structs.replace(
        state, done=1, input_offset=reader.offset, next_line=reader.next_line, results_bytes=4
    )
    store.commit(results, b"one\n", done)
    results.write(b"two\npartial")  # appended, never checkpointed: then a crash
    results.close()
    reader.close()
    [loaded] = store.load_all()
    assert loaded == done
    reader, results = store.resume(loaded, max_line_bytes=100)
    assert [line.raw for line in reader.read(5)] == [b"b", b"c"]
    results.write(b"two\nthree\n")
    results.close()
    reader.close()
    assert store.results_path("batch_x").read_bytes() == b"one\ntwo\nthree\n"
    assert first.raw == b"a"
