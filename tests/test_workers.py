"""`appliance serve --workers 2` as a real process tree on a free loopback port: both workers
answer; limits, quotas, keys, saved classifiers and jobs are shared exactly across them; a
killed worker is restarted; SIGTERM drains and exits 0.

Every request below opens its own connection (httpx's module functions), so the kernel's
SO_REUSEPORT spreading sends them to both workers; the first test shows that it does.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

import appliance
from tests.cluster_servers import free_port

ROOT = Path(appliance.__file__).parent.parent
EMBED = "/v1/text-vectorisation"


@dataclass
class Workers:
    """One `python -m appliance serve --workers N` (this tree's code, not the installed
    entry point's)."""

    folder: Path
    models: Path
    count: int = 2
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    admin_secret: str | None = None

    def __post_init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"

    def start(self) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "APPLIANCE_DATA_DIR": str(self.data),
            "APPLIANCE_MODELS_DIR": str(self.models),
            "APPLIANCE_SERVER__LOG_FORMAT": "text",
            "APPLIANCE_SERVER__SHUTDOWN_GRACE_SECONDS": "10",
            # No rescans of models_dir while the tests run: a model change reaches the other
            # workers by the change marker alone.
            "APPLIANCE_MODELS__WATCH_INTERVAL_SECONDS": "300",
            **self.env,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "serve", "--port", str(self.port)]
            + ["--workers", str(self.count)],
            env=env,
            cwd=self.folder,
            stdout=open(self.log, "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )

    def pids(self, want: int, seconds: float = 60, exclude: set[int] = frozenset()) -> set[int]:  # type: ignore[assignment]
        """The worker pids /readyz names, once `want` distinct ready ones (not in `exclude`)
        have answered."""
        seen: set[int] = set()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                r = httpx.get(f"{self.url}/readyz", timeout=2)
                if r.status_code == 200 and r.json()["worker_pid"] not in exclude:
                    seen.add(r.json()["worker_pid"])
                    if len(seen) >= want:
                        return seen
                    continue
            time.sleep(0.05)
        raise RuntimeError(f"saw workers {seen}, not {want}: {self.log.read_text()[-3000:]}")

    def admin(self) -> dict[str, str]:
        secret = self.admin_secret or (self.data / "admin.key").read_text().strip()
        return {"x-api-key": secret}

    def key(self, **fields: Any) -> tuple[str, dict[str, str]]:
        r = httpx.post(
            f"{self.url}/v1/keys",
            json={"name": "w", "scopes": ["predict", "jobs"], **fields},
            headers=self.admin(),
        )
        assert r.status_code == 201, r.text
        return r.json()["id"], {"x-api-key": r.json()["key"]}

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Workers]:
    folder = tmp_path_factory.mktemp("workers")
    shutil.copytree(models_dir, folder / "models")  # its own: a test deletes a model
    server = Workers(folder, folder / "models")
    server.start()
    try:
        server.pids(2)
        yield server
    finally:
        server.stop()


def embed(server: Workers, auth: dict[str, str], text: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}{EMBED}", json={"text": text, "model": "tiny-embed"}, headers=auth
    )


def at_once(n: int, call: Any) -> list[Any]:
    """`call(i)` for i < n from 16 threads, each request on its own connection."""
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(call, range(n)))


def test_both_workers_answer_and_one_admin_key_was_made(workers: Workers) -> None:
    pids = workers.pids(2)
    assert len(pids) == 2 and os.getpid() not in pids
    assert workers.proc is not None and workers.proc.pid not in pids  # children, not the parent
    keys = json.loads((workers.data / "keys.json").read_text())["keys"]
    assert [k["name"] for k in keys] == ["admin"]  # two workers started, one bootstrap key


def test_the_request_limit_is_exact_across_workers(workers: Workers) -> None:
    # 10 per minute refills one every 6 s: far slower than the burst below takes.
    _, auth = workers.key(requests_per_minute=10)
    statuses = [r.status_code for r in at_once(40, lambda i: embed(workers, auth, f"r {i}"))]
    assert statuses.count(200) == 10, statuses
    assert statuses.count(429) == 30


def test_the_token_quota_is_never_overspent(workers: Workers) -> None:
    quota = 40
    _, auth = workers.key(token_quota=quota)
    answers = at_once(40, lambda i: embed(workers, auth, f"quota text number {i}"))
    passed = [int(r.headers["x-tokens-used"]) for r in answers if r.status_code == 200]
    assert {r.status_code for r in answers} == {200, 402}
    balance = httpx.get(f"{workers.url}/v1/balance", headers=auth).json()
    assert balance["spent"] == sum(passed) <= quota
    assert all(r.json()["code"] == "INSUFFICIENT_BALANCE" for r in answers if r.status_code == 402)


def test_a_key_revoked_via_one_worker_is_refused_by_all(workers: Workers) -> None:
    key_id, auth = workers.key()
    # Every worker has read the key (and cached it) before the revoke.
    assert {r.status_code for r in at_once(16, lambda i: embed(workers, auth, "k"))} == {200}
    revoked = httpx.delete(f"{workers.url}/v1/keys/{key_id}", headers=workers.admin())
    assert revoked.status_code == 200, revoked.text
    assert {r.status_code for r in at_once(24, lambda i: embed(workers, auth, "k"))} == {401}


def test_a_classifier_saved_via_one_worker_is_usable_via_all(workers: Workers) -> None:
    _, auth = workers.key()
    spec = {"name": "triage", "labels": ["bug", "praise"], "model": "tiny-embed"}
    saved = httpx.post(f"{workers.url}/v1/classifiers", json=spec, headers=auth)
    assert saved.status_code == 201, saved.text

    def use(i: int) -> httpx.Response:
        body = {"text": f"it broke {i}", "classifier": "triage"}
        return httpx.post(f"{workers.url}/v1/classify", json=body, headers=auth)

    answers = at_once(20, use)
    assert [r.status_code for r in answers] == [200] * 20
    assert all(list(r.json()["scores"]) == ["bug", "praise"] for r in answers)
    # A second save of the name via any worker sees the first one's.
    assert httpx.post(f"{workers.url}/v1/classifiers", json=spec, headers=auth).status_code == 409


def start_job(workers: Workers, auth: dict[str, str], lines: int, text: str) -> str:
    """A batch job of `lines` embedding lines ("<text> N"), created and started; its id."""
    body = b"".join(b'{"text": "%s %d"}\n' % (text.encode(), i) for i in range(lines))
    created = httpx.post(
        f"{workers.url}/v1/batch",
        params={"endpoint": EMBED},
        content=body,
        headers={**auth, "Content-Type": "application/x-ndjson"},
    )
    assert created.status_code == 201, created.text
    job_id: str = created.json()["id"]
    started = httpx.post(f"{workers.url}/v1/batch/{job_id}/start", headers=auth)
    assert started.status_code == 200, started.text
    return job_id


def test_a_job_runs_once_and_every_worker_answers_its_status(workers: Workers) -> None:
    _, auth = workers.key()
    lines = 200
    job_id = start_job(workers, auth, lines, "job line")
    deadline = time.monotonic() + 30
    while True:
        views = at_once(8, lambda i: httpx.get(f"{workers.url}/v1/batch/{job_id}", headers=auth))
        assert {r.status_code for r in views} == {200}
        if all(r.json()["status"] == "completed" for r in views):
            break
        assert time.monotonic() < deadline, views[0].text
        time.sleep(0.2)
    results = httpx.get(f"{workers.url}/v1/batch/{job_id}/results", headers=auth)
    rows = [json.loads(line) for line in results.text.splitlines()]
    assert len(rows) == lines
    log = workers.log.read_text()
    assert log.count(f"job {job_id} started") == 1
    assert f"job {job_id} taken over" not in log


def lock_holder(path: Path) -> int | None:
    """The pid holding an flock on `path`, from the kernel's /proc/locks."""
    inode = path.stat().st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "FLOCK" in fields and fields[-3].endswith(f":{inode}"):
            return int(fields[-4])
    return None


def test_a_job_whose_worker_dies_is_taken_over_and_still_gives_every_line_once(
    workers: Workers,
) -> None:
    _, auth = workers.key()
    lines = 4000
    job_id = start_job(workers, auth, lines, "long job line")
    lock = workers.data / "workers" / "locks" / f"job_leases-{job_id}.lock"
    holder = lock_holder(lock)
    assert holder is not None and holder in workers.pids(2)
    os.kill(holder, signal.SIGKILL)
    deadline = time.monotonic() + 40
    while True:
        view = httpx.get(f"{workers.url}/v1/batch/{job_id}", headers=auth).json()
        if view["status"] == "completed":
            break
        assert time.monotonic() < deadline, view
        time.sleep(0.2)
    rows = httpx.get(f"{workers.url}/v1/batch/{job_id}/results", headers=auth).text.splitlines()
    assert len(rows) == lines
    assert f"job {job_id} taken over" in workers.log.read_text()
    assert lock_holder(lock) is None  # finished: let go
    workers.pids(2, exclude={holder})  # and the dead one's replacement serves


def test_metrics_count_every_workers_requests(workers: Workers) -> None:
    _, auth = workers.key()
    before = requests_seen(workers)
    at_once(20, lambda i: embed(workers, auth, f"metrics {i}"))
    # Any worker's /metrics: both workers' counters summed.
    assert all(requests_seen(workers) - before == 20 for _ in range(6))


def requests_seen(server: Workers) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("appliance_requests_total{") and f'endpoint="POST {EMBED}"' in line
    )


def test_a_model_deleted_via_one_worker_stops_on_all_at_once(workers: Workers) -> None:
    def listed(i: int) -> set[str]:
        r = httpx.get(f"{workers.url}/v1/models", headers=workers.admin())
        return {m["id"] for m in r.json()["data"]}

    assert all("tiny-tags" in seen for seen in at_once(12, listed))
    r = httpx.delete(f"{workers.url}/v1/models/tiny-tags", headers=workers.admin())
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 2  # rescans are 300 s apart: only the marker can do it
    while any("tiny-tags" in seen for seen in at_once(12, listed)):
        assert time.monotonic() < deadline, "a worker still lists the deleted model"
        time.sleep(0.1)
    assert all("tiny-embed" in seen for seen in at_once(12, listed))


def test_a_killed_worker_is_restarted(workers: Workers) -> None:
    pids = workers.pids(2)
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    replacement = workers.pids(1, exclude=pids, seconds=30)
    assert replacement and not replacement & pids
    assert workers.pids(2, exclude={victim}) == (pids - {victim}) | replacement
    assert f"(pid {victim}) exited with code -9: restarting it" in workers.log.read_text()


def test_sigterm_drains_in_flight_requests_and_exits_0(tmp_path: Path, models_dir: Path) -> None:
    server = Workers(tmp_path, models_dir)
    server.start()
    try:
        server.pids(2)
        _, auth = server.key()
        answer: list[httpx.Response] = []
        sent_head = threading.Event()

        def slow_body() -> Iterator[bytes]:
            yield b'{"model": "tiny-embed", "text": '
            sent_head.set()
            time.sleep(1.0)  # SIGTERM arrives while this request is in flight
            yield b'"still answered"}'

        def send() -> None:
            answer.append(
                httpx.post(
                    f"{server.url}{EMBED}",
                    content=slow_body(),
                    headers={**auth, "content-type": "application/json"},
                    timeout=20,
                )
            )

        thread = threading.Thread(target=send)
        thread.start()
        assert sent_head.wait(10)
        time.sleep(0.2)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        thread.join(20)
        assert answer and answer[0].status_code == 200, answer
        assert server.proc.wait(30) == 0
        log = server.log.read_text()
        assert log.count("shutdown requested: draining in-flight requests") == 2
    finally:
        server.stop()


@pytest.mark.parametrize("reuseport", [False, True], ids=["plain", "so_reuseport"])
def test_a_taken_port_fails_at_once(tmp_path: Path, models_dir: Path, reuseport: bool) -> None:
    """Also when its listener uses SO_REUSEPORT (another appliance on the port): the kernel
    would otherwise split the connections between the two servers."""
    server = Workers(tmp_path, models_dir)
    with socket.socket() as taken:
        if reuseport:
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", server.port))
        taken.listen()
        server.start()
        assert server.proc is not None
        assert server.proc.wait(30) == 1
    assert f"cannot listen on 127.0.0.1:{server.port}" in server.log.read_text()


def test_workers_must_be_at_least_one(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from appliance.cli import app

    env = {"APPLIANCE_DATA_DIR": str(tmp_path / "data")}
    umask = os.umask(0o022)  # `serve` sets the process's umask: give this one back after
    try:
        result = CliRunner().invoke(app, ["serve", "--workers", "0"], env=env)
    finally:
        os.umask(umask)
    assert result.exit_code == 2
    assert "server.workers" in result.output


def test_with_cluster_backends_workers_are_replicas_that_hear_each_other(
    tmp_path: Path, models_dir: Path, cluster_env: dict[str, str]
) -> None:
    """[cluster] set: each worker opens PostgreSQL and Redis as a replica of its own name, so
    a revoke via one reaches the others by pub/sub at once (under one shared name each
    would skip the other's message as its own, and wait for the 5 s refresh)."""
    secret = "apl_workers-cluster-admin-secret"
    (tmp_path / "admin.secret").write_text(secret)
    env = {**cluster_env, "APPLIANCE_AUTH__ADMIN_KEY_FILE": str(tmp_path / "admin.secret")}
    server = Workers(tmp_path, models_dir, env=env, admin_secret=secret)
    server.start()
    try:
        assert len(server.pids(2)) == 2
        key_id, auth = server.key()
        assert {r.status_code for r in at_once(16, lambda i: embed(server, auth, "c"))} == {200}
        revoked = httpx.delete(f"{server.url}/v1/keys/{key_id}", headers=server.admin())
        assert revoked.status_code == 200, revoked.text
        time.sleep(1.0)  # pub/sub: milliseconds; the fallback refresh: 5 s
        assert {r.status_code for r in at_once(16, lambda i: embed(server, auth, "c"))} == {401}
    finally:
        assert server.stop() == 0
