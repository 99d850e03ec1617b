"""Three appliance replicas behind a real nginx (round robin), sharing a real PostgreSQL and
Redis: limits, quotas, revocation, cache, usage, job takeover after kill -9, and what each
backend's outage does. Every server is started here, on free loopback ports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster_servers import Nginx, Postgres, Redis, Replica, free_port, start_redis

MODEL = "tiny-embed"


@dataclass
class Cluster:
    replicas: list[Replica]
    nginx: Nginx
    redis: Redis
    postgres: Postgres
    env: dict[str, str]
    root: Path
    admin: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.nginx.port}"

    def direct(self, i: int) -> str:
        return f"http://127.0.0.1:{self.replicas[i].port}"

    def key(self, *args: str) -> tuple[str, str]:
        """(id, secret) of a key made by `appliance keys create` against the database."""
        cli = Path(sys.executable).with_name("appliance")
        made = subprocess.run(
            [str(cli), "keys", "create", "--name", "t", *args],
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            check=True,
        )
        lines = made.stdout.strip().splitlines()
        return lines[0].split()[2], lines[-1]

    def set_limits(self, key_id: str, *args: str) -> None:
        cli = Path(sys.executable).with_name("appliance")
        subprocess.run(
            [str(cli), "keys", "set-limits", key_id, *args],
            env=self.env,
            cwd=self.root,
            capture_output=True,
            check=True,
        )


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, postgres: Postgres
) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    redis = start_redis()  # this module's own: test 7 stops and restarts it
    shared_models = root / "models"  # the replicas' own copy: test 8 uploads into it
    shutil.copytree(models_dir, shared_models)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "APPLIANCE_MODELS_DIR": str(shared_models),
        "APPLIANCE_AUTH__BOOTSTRAP_ADMIN_KEY": "false",
        "APPLIANCE_CLUSTER__DATABASE_URL": postgres.new_database(),
        "APPLIANCE_CLUSTER__REDIS_URL": redis.new_url(),
        "APPLIANCE_JOBS__DIR": str(root / "shared-jobs"),  # the volume every replica mounts
        "APPLIANCE_JOBS__MIN_FREE_BYTES": "0",
        "APPLIANCE_SERVER__LOG_FORMAT": "text",
        "APPLIANCE_SERVER__SHUTDOWN_GRACE_SECONDS": "3",
    }
    replicas = []
    for i in range(3):
        mine = {
            **env,
            "APPLIANCE_DATA_DIR": str(root / f"data{i}"),
            "APPLIANCE_CLUSTER__REPLICA_ID": f"replica-{i}",
            # The third replica admits when Redis is down; the others refuse (the default).
            "APPLIANCE_CLUSTER__ON_REDIS_DOWN": "fail_open" if i == 2 else "fail_closed",
        }
        replicas.append(Replica(free_port(), mine, root, f"replica-{i}"))
    nginx = Nginx(free_port(), root, [r.port for r in replicas])
    made = Cluster(
        replicas, nginx, redis, postgres, {**env, "APPLIANCE_DATA_DIR": str(root)}, root, ""
    )
    _, made.admin = made.key("--scopes", "admin")
    try:
        for r in replicas:
            r.start()
        for r in replicas:
            r.wait_ready()
        nginx.start()
        yield made
    finally:
        nginx.stop()
        for r in replicas:
            r.stop()
        redis.stop()


def embed(client: httpx.Client, secret: str, text: str, **headers: str) -> httpx.Response:
    return client.post(
        "/v1/text-vectorisation",
        json={"text": text, "model": MODEL},
        headers={"x-api-key": secret, **headers},
    )


def wait_for(check: Any, seconds: float, step: float = 0.05) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def test_1_a_request_limit_holds_across_replicas(cluster: Cluster) -> None:
    key_id, secret = cluster.key("--scopes", "predict")
    cluster.set_limits(key_id, "--requests-per-minute", "60")
    statuses: list[int] = []
    retry_after: list[str] = []
    with httpx.Client(base_url=cluster.url, timeout=30) as client:
        embed(client, secret, "warm")  # a cache entry: the 150 below are cheap hits
        began = time.monotonic()

        def one(_: int) -> None:
            r = embed(client, secret, "warm")
            statuses.append(r.status_code)
            if r.status_code == 429:
                retry_after.append(r.headers["retry-after"])

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(150)))
        elapsed = time.monotonic() - began
    assert elapsed < 10
    admitted = statuses.count(200)
    # The bucket holds 60 and refills at 1 per second: 59 are left after the warm-up, and the
    # burst gets what refilled while it ran — and not one more, whichever replica answered.
    assert 59 <= admitted <= 59 + int(elapsed) + 1, (admitted, elapsed)
    assert statuses.count(429) == 150 - admitted and all(int(s) >= 1 for s in retry_after)


def test_2_token_limits_and_quotas_are_never_overspent(cluster: Cluster) -> None:
    quota_id, quota_key = cluster.key("--scopes", "predict")
    cluster.set_limits(quota_id, "--token-quota", "400")
    tpm_id, tpm_key = cluster.key("--scopes", "predict")
    cluster.set_limits(tpm_id, "--tokens-per-minute", "300")
    charged: dict[str, list[int]] = {quota_key: [], tpm_key: []}
    codes: dict[str, list[int]] = {quota_key: [], tpm_key: []}
    lock = threading.Lock()

    def client(n: int) -> None:
        with httpx.Client(base_url=cluster.url, timeout=30) as c:
            for i in range(8):
                for secret in (quota_key, tpm_key):
                    r = embed(
                        c, secret, f"client {n} text {i} words", **{"cache-control": "no-store"}
                    )
                    with lock:
                        codes[secret].append(r.status_code)
                        if r.status_code == 200:
                            charged[secret].append(int(r.headers["x-tokens-used"]))

    began = time.monotonic()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(25)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    assert sum(charged[quota_key]) <= 400 and 402 in codes[quota_key]
    assert set(codes[quota_key]) <= {200, 402}
    with httpx.Client(base_url=cluster.url, timeout=30) as c:
        balance = c.get("/v1/balance", headers={"x-api-key": quota_key}).json()
        assert balance["spent"] == sum(charged[quota_key]) and balance["spent"] <= 400
        remaining = 400 - balance["spent"]
        longer = " ".join(["word"] * (remaining + 5))  # more tokens than are left
        assert embed(c, quota_key, longer).status_code == 402
    # 300 tokens a minute, refilling at 5 a second while the clients ran.
    assert sum(charged[tpm_key]) <= 300 + 5 * elapsed + 10, (sum(charged[tpm_key]), elapsed)
    assert 429 in codes[tpm_key] and set(codes[tpm_key]) <= {200, 429}


def test_3_a_key_revoked_on_one_replica_is_refused_by_the_others_within_a_second(
    cluster: Cluster,
) -> None:
    key_id, secret = cluster.key("--scopes", "predict")
    clients = [httpx.Client(base_url=cluster.direct(i), timeout=30) for i in range(3)]
    try:
        for c in clients:
            assert embed(c, secret, "before").status_code == 200
        revoked = clients[0].delete(f"/v1/keys/{key_id}", headers={"x-api-key": cluster.admin})
        assert revoked.status_code == 200
        began = time.monotonic()
        for c in clients[1:]:
            refused = wait_for(lambda c=c: embed(c, secret, "after").status_code == 401, 1.0)
            assert refused, "still admitted a second after the revocation"
        assert time.monotonic() - began < 1.5
    finally:
        for c in clients:
            c.close()


def test_4_an_answer_computed_on_one_replica_is_a_hit_on_another(cluster: Cluster) -> None:
    _, secret = cluster.key("--scopes", "predict")
    with (
        httpx.Client(base_url=cluster.direct(0), timeout=30) as one,
        httpx.Client(base_url=cluster.direct(1), timeout=30) as two,
    ):
        first = embed(one, secret, "computed once, shared by all")
        assert first.headers["x-cache"] == "MISS"
        second = wait_for(
            lambda: (
                (r := embed(two, secret, "computed once, shared by all")).headers["x-cache"]
                == "HIT"
                and r
            ),
            3.0,
        )
        assert second, "never a HIT on the second replica"
        assert second.json() == first.json() and second.headers["x-tokens-used"] == "0"


def test_5_usage_and_logs_count_every_replicas_requests(cluster: Cluster) -> None:
    key_id, secret = cluster.key("--scopes", "predict")
    with httpx.Client(base_url=cluster.url, timeout=30) as c:
        tokens = sum(
            int(embed(c, secret, f"usage {i}").headers["x-tokens-used"]) for i in range(12)
        )

    def model_rows(c: httpx.Client) -> list[dict[str, Any]]:
        usage = c.get("/v1/usage", headers={"x-api-key": secret}).json()["data"]
        return [row for row in usage if row["model"] == MODEL]  # not the /v1/usage calls

    for i in range(3):  # every replica tells the same totals
        with httpx.Client(base_url=cluster.direct(i), timeout=30) as c:
            rows = wait_for(lambda c=c: (r := model_rows(c)) and r[0]["requests"] == 12 and r, 3.0)
            assert rows and rows[0]["tokens"] == tokens, rows
            logs = c.get("/v1/logs", headers={"x-api-key": secret}, params={"limit": 100})
            rows = [r for r in logs.json()["data"] if r["endpoint"].endswith("vectorisation")]
            assert len(rows) == 12 and {r["key_id"] for r in rows} == {key_id}
    # Round robin spread them: more than one replica wrote them.
    import psycopg

    with psycopg.connect(cluster.env["APPLIANCE_CLUSTER__DATABASE_URL"]) as conn:
        replicas = conn.execute(
            "SELECT count(DISTINCT replica) FROM requests WHERE key_id = %s", (key_id,)
        ).fetchone()
    assert replicas is not None and replicas[0] >= 2


def test_6_a_job_whose_replica_is_killed_is_finished_by_another(cluster: Cluster) -> None:
    import psycopg

    total = 20_000
    _, secret = cluster.key("--scopes", "predict,jobs")
    headers = {"x-api-key": secret}
    body = b"".join(
        json.dumps({"text": f"line {i} of the job"}).encode() + b"\n" for i in range(total)
    )
    with httpx.Client(base_url=cluster.url, timeout=60, headers=headers) as c:
        made = c.post(
            "/v1/batch",
            params={"endpoint": "/v1/text-vectorisation", "model": MODEL},
            content=body,
            headers={"content-type": "application/x-ndjson"},
        )
        assert made.status_code == 201, made.text
        job_id = made.json()["id"]
        assert c.post(f"/v1/batch/{job_id}/start").status_code == 200
        assert wait_for(lambda: c.get(f"/v1/batch/{job_id}").json()["done"] >= 2000, 120, 0.1)
        with psycopg.connect(cluster.env["APPLIANCE_CLUSTER__DATABASE_URL"]) as conn:
            holder = conn.execute(
                "SELECT replica FROM job_leases WHERE job_id = %s", (job_id,)
            ).fetchone()
        assert holder is not None
        victim = next(r for r in cluster.replicas if r.name == holder[0])
        victim.kill()  # kill -9 mid-job: no checkpoint, no lease released
        killed_at = c.get(f"/v1/batch/{job_id}").json()
        assert killed_at["status"] == "running" and killed_at["done"] < total
        finished = wait_for(
            lambda: (j := c.get(f"/v1/batch/{job_id}").json())["status"] == "completed" and j,
            180,
            0.5,
        )
        assert finished and finished["done"] == total, c.get(f"/v1/batch/{job_id}").json()
        results = c.get(f"/v1/batch/{job_id}/results")
        numbers = []
        for raw in results.content.splitlines():
            line = json.loads(raw)
            assert line["status"] == 200 and len(line["response"]["vector"]) == 32
            numbers.append(line["line"])
        assert numbers == list(range(1, total + 1))  # every line exactly once, in order
    with psycopg.connect(cluster.env["APPLIANCE_CLUSTER__DATABASE_URL"]) as conn:
        taken = conn.execute("SELECT count(*) FROM job_leases WHERE job_id = %s", (job_id,))
        assert taken.fetchone() == (0,)  # released by the replica that finished it
    victim.start()
    victim.wait_ready()


def test_7a_redis_down_follows_on_redis_down_and_recovers(cluster: Cluster) -> None:
    _, secret = cluster.key("--scopes", "predict")
    closed = httpx.Client(base_url=cluster.direct(0), timeout=30)
    opened = httpx.Client(base_url=cluster.direct(2), timeout=30)
    try:
        assert embed(opened, secret, "cached before the outage").status_code == 200
        load_codes: list[int] = []
        stop = threading.Event()

        def load() -> None:  # through the load balancer, the whole time Redis is away
            with httpx.Client(base_url=cluster.url, timeout=30) as c:
                n = 0
                while not stop.is_set():
                    load_codes.append(embed(c, secret, f"under load {n % 50}").status_code)
                    n += 1

        workers = [threading.Thread(target=load) for _ in range(4)]
        for w in workers:
            w.start()
        time.sleep(0.3)
        cluster.redis.stop()
        statuses = [embed(closed, secret, f"during {i}").status_code for i in range(20)]
        refused = embed(closed, secret, "during")
        assert set(statuses) == {503}, statuses  # refused, never a 500
        assert refused.json()["code"] == "BACKEND_UNAVAILABLE" and refused.headers["retry-after"]
        # fail_open: admitted, and the disk cache (first level) still answers.
        hit = embed(opened, secret, "cached before the outage")
        assert hit.status_code == 200 and hit.headers["x-cache"] == "HIT"
        assert embed(opened, secret, "new during the outage").status_code == 200
        ready = closed.get("/readyz").json()
        assert ready["backends"]["redis"] == "down" and closed.get("/readyz").status_code == 200
        metrics = opened.get("/metrics").text
        assert 'appliance_backend_up{backend="redis"} 0.0' in metrics
        assert "appliance_backend_fail_open_total" in metrics
        cluster.redis.start()  # the same port, empty: buckets and counters start afresh
        began = time.monotonic()
        back = wait_for(lambda: embed(closed, secret, "after").status_code == 200, 5.0, 0.1)
        assert back, "not normal within 5 s of Redis coming back"
        assert time.monotonic() - began < 5
        assert wait_for(lambda: closed.get("/readyz").json()["backends"]["redis"] == "up", 5)
        stop.set()
        for w in workers:
            w.join()
        assert load_codes and 500 not in load_codes and set(load_codes) <= {200, 503}
        assert 503 in load_codes and 200 in load_codes  # refused (fail_closed) and admitted
    finally:
        stop.set()
        closed.close()
        opened.close()


def test_7b_postgres_down_loses_no_accepted_usage(cluster: Cluster) -> None:
    key_id, secret = cluster.key("--scopes", "predict")
    known = 0
    for i in range(3):  # every replica has loaded the new key before PostgreSQL goes
        with httpx.Client(base_url=cluster.direct(i), timeout=30) as c:
            text = f"known {i}"
            first = wait_for(lambda c=c, t=text: (r := embed(c, secret, t)).is_success and r, 2)
            assert first and first.headers["x-cache"] == "MISS"
            known += int(first.headers["x-tokens-used"])
    with httpx.Client(base_url=cluster.url, timeout=30) as c:
        cluster.postgres.stop()
        try:
            during = [embed(c, secret, f"pg down {i}") for i in range(9)]
            # Keys (in memory) and limits (Redis) need no PostgreSQL.
            assert all(r.status_code == 200 for r in during), [r.text for r in during]
            logs = c.get("/v1/logs", headers={"x-api-key": secret})
            assert logs.status_code == 503 and logs.json()["code"] == "BACKEND_UNAVAILABLE"
            made = c.post("/v1/keys", json={"name": "x"}, headers={"x-api-key": cluster.admin})
            assert made.status_code == 503
            ready = c.get("/readyz").json()
            assert ready["backends"]["postgres"] == "down"
        finally:
            cluster.postgres.start()
        tokens = sum(int(r.headers["x-tokens-used"]) for r in during) + known

        seen: list[Any] = []

        def embedded() -> dict[str, Any] | None:
            r = c.get("/v1/usage", headers={"x-api-key": secret})
            seen.append(r.json())
            rows = (
                [row for row in r.json()["data"] if row["model"] == MODEL] if r.is_success else []
            )
            return rows[0] if rows and rows[0]["requests"] == 3 + 9 else None

        usage = wait_for(embedded, 15.0, 0.2)
        assert usage, f"the requests made while PostgreSQL was down were not written: {seen[-3:]}"
        assert usage["tokens"] == tokens
    import psycopg

    with psycopg.connect(cluster.env["APPLIANCE_CLUSTER__DATABASE_URL"]) as conn:
        spent = conn.execute("SELECT tokens FROM spend WHERE key_id = %s", (key_id,)).fetchone()
        by_replica = conn.execute(
            "SELECT replica, sum(tokens) FROM requests WHERE key_id = %s GROUP BY replica",
            (key_id,),
        ).fetchall()
    assert spent == (tokens,), by_replica  # the durable spend caught up too


def test_8_models_and_classifiers_changed_on_one_replica_reach_the_others(
    cluster: Cluster,
) -> None:
    import io
    import zipfile

    _, secret = cluster.key("--scopes", "predict")
    admin = {"x-api-key": cluster.admin}
    one = httpx.Client(base_url=cluster.direct(0), timeout=60)
    two = httpx.Client(base_url=cluster.direct(1), timeout=60)
    try:
        # A classifier saved through one replica is usable on another at once.
        spec = {"name": "routing", "labels": ["billing", "bug"], "model": MODEL}
        assert one.post("/v1/classifiers", json=spec, headers=admin).status_code == 201
        body = {"text": "my invoice is wrong", "classifier": "routing"}
        began = time.monotonic()
        used = wait_for(
            lambda: two.post("/v1/classify", json=body, headers={"x-api-key": secret}).is_success,
            1.0,
            0.02,
        )
        assert used, "the classifier did not reach the other replica within a second"
        assert time.monotonic() - began < 1.2

        # An exported model uploaded to one replica is served by the others.
        buffer = io.BytesIO()
        folder = cluster.root / "models" / MODEL
        with zipfile.ZipFile(buffer, "w") as zf:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    zf.write(path, str(path.relative_to(folder)))
        up = one.post(
            "/v1/models",
            params={"name": "tiny-embed-copy"},
            content=buffer.getvalue(),
            headers={**admin, "content-type": "application/zip"},
        )
        assert up.status_code == 202, up.text
        built = wait_for(
            lambda: (
                one.get("/v1/models/tiny-embed-copy", headers=admin).json()["data"]["build_status"]
                == "success"
            ),
            60,
            0.05,
        )
        assert built
        began = time.monotonic()
        served = wait_for(
            lambda: embed_with(two, secret, "tiny-embed-copy").status_code == 200, 1.5, 0.02
        )
        assert served, "the uploaded model was not served by the other replica"
        print(f"model reached the other replica {time.monotonic() - began:.2f} s after success")
        gone = one.delete("/v1/models/tiny-embed-copy", headers=admin)
        assert gone.status_code == 200
        began = time.monotonic()
        removed = wait_for(
            lambda: embed_with(two, secret, "tiny-embed-copy").status_code == 404, 1.0, 0.02
        )
        assert removed, "the deleted model was still served by the other replica after 1 s"
    finally:
        one.close()
        two.close()


def embed_with(client: httpx.Client, secret: str, model: str) -> httpx.Response:
    return client.post(
        "/v1/text-vectorisation",
        json={"text": "which model", "model": model},
        headers={"x-api-key": secret},
    )
