"""Cluster-mode backends against a real PostgreSQL and Redis (started by the session's
fixtures): the same rules as the single box's files, now shared by every replica."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from appliance.app import create_app
from appliance.classifiers import Classifier
from appliance.cluster.database import Database
from appliance.cluster.events import Events
from appliance.cluster.health import BackendHealth
from appliance.cluster.keys import PgKeyStore
from appliance.cluster.limits import RedisLimiter, RedisSpend
from appliance.cluster.migrations import MIGRATIONS
from appliance.cluster.redis_client import RedisBackend
from appliance.errors import BackendUnavailable, InsufficientBalance, RateLimited
from tests.conftest import make_settings


@pytest.fixture
def db(cluster_env: dict[str, str]) -> Iterator[Database]:
    database = Database(cluster_env["APPLIANCE_CLUSTER__DATABASE_URL"], BackendHealth())
    database.open()
    yield database
    database.close()


@pytest.fixture
def redis_backend(cluster_env: dict[str, str]) -> Iterator[RedisBackend]:
    backend = RedisBackend(cluster_env["APPLIANCE_CLUSTER__REDIS_URL"], BackendHealth())
    yield backend
    backend.close()


def test_migrations_run_once_when_replicas_start_together(postgres: Any) -> None:
    url = postgres.new_database()
    errors: list[BaseException] = []

    def start() -> None:
        try:
            Database(url, BackendHealth()).open()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    db = Database(url, BackendHealth())
    db.open()
    with db.connection() as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations")]
    db.close()
    assert versions == [v for v, _ in MIGRATIONS]  # each once, in order


def test_request_bucket_bursts_to_the_limit_then_refills(redis_backend: RedisBackend) -> None:
    limiter = RedisLimiter(redis_backend, fail_open=False)
    admitted = 0
    for _ in range(130):
        try:
            state = limiter.admit_request("k1", 120, 10_000)
            admitted += 1
        except RateLimited as exc:
            assert exc.retry_after is not None and exc.retry_after >= 1
            assert exc.headers["X-RateLimit-Remaining-Requests"] == "0"
    assert admitted == 120  # a 120/min bucket: 2 per second refill, so the burst is exact
    assert state.limit_requests == 120
    time.sleep(0.6)  # 2 per second: one more request fits
    limiter.admit_request("k1", 120, 10_000)


def test_token_bucket_charges_exactly_and_refunds(redis_backend: RedisBackend) -> None:
    limiter = RedisLimiter(redis_backend, fail_open=False)
    state = limiter.admit_tokens("k2", 60, 1000, 900)
    assert state.remaining_tokens <= 100
    with pytest.raises(RateLimited):
        limiter.admit_tokens("k2", 60, 1000, 200)
    limiter.settle_tokens("k2", 1000, -500)  # the request used 400, not 900
    assert limiter.admit_tokens("k2", 60, 1000, 550).remaining_tokens <= 50
    with pytest.raises(RateLimited) as over:
        limiter.admit_tokens("k2", 60, 1000, 5000)
    assert over.value.details["needed"] == 5000  # more than the limit: never, split it
    # A settle never touched the requests bucket.
    assert limiter.state("k2", 60, 1000).remaining_requests == 60


def test_quota_is_never_overspent_by_concurrent_charges(redis_backend: RedisBackend) -> None:
    spend = RedisSpend(redis_backend, lambda key_id: 0, fail_open=False)
    admitted, refused = [], []

    def client() -> None:
        for _ in range(20):
            try:
                spend.charge("k3", 1000, 7)
                admitted.append(7)
            except InsufficientBalance:
                refused.append(1)

    threads = [threading.Thread(target=client) for _ in range(25)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(admitted) == 994 and spend.spent("k3") == 994  # 142 x 7; a 143rd would pass
    assert len(refused) == 25 * 20 - 142


def test_quota_counter_lost_by_redis_starts_from_the_durable_total(
    redis_backend: RedisBackend,
) -> None:
    spend = RedisSpend(redis_backend, lambda key_id: 990, fail_open=False)
    with pytest.raises(InsufficientBalance):
        spend.charge("k4", 1000, 20)
    assert spend.charge("k4", 1000, 10) == 1000


def test_redis_down_fails_closed_or_open(tmp_path: Path) -> None:
    from tests.cluster_servers import free_port

    health = BackendHealth()
    dead = RedisBackend(f"redis://127.0.0.1:{free_port()}/0", health)
    started = time.perf_counter()
    with pytest.raises(BackendUnavailable) as closed:
        RedisLimiter(dead, fail_open=False).admit_request("k", 60, 100)
    assert closed.value.retry_after and time.perf_counter() - started < 1.5
    assert health.states() == {"redis": "down"}
    state = RedisLimiter(dead, fail_open=True).admit_request("k", 60, 100)
    assert state.remaining_requests == 60 and health.fail_open == 1


def test_a_revoked_key_is_refused_by_another_replica_within_a_second(
    db: Database, redis_backend: RedisBackend, cluster_env: dict[str, str]
) -> None:
    other_db = Database(cluster_env["APPLIANCE_CLUSTER__DATABASE_URL"], BackendHealth())
    other_db.open()
    here_events, there_events = Events(redis_backend, "a"), Events(redis_backend, "b")
    here, there = PgKeyStore(db, here_events), PgKeyStore(other_db, there_events)
    there.start()
    there_events.start()
    try:
        key, secret = here.create("k", ["predict"], models=["tiny-embed"])
        deadline = time.monotonic() + 1
        while there.authenticate(secret) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert there.authenticate(secret) is not None
        assert there.authenticate(secret).models == ["tiny-embed"]  # type: ignore[union-attr]
        here.revoke(key.id)
        revoked_at = time.monotonic()
        while there.authenticate(secret) is not None and time.monotonic() - revoked_at < 1:
            time.sleep(0.01)
        assert there.authenticate(secret) is None
        assert there_events.received >= 1  # the revocation came by pub/sub, not the poll
        stored = db.connection
        with stored() as conn:  # only the hash is stored
            assert conn.execute("SELECT count(*) FROM api_keys WHERE hash = %s", (secret,))
            row = conn.execute("SELECT hash FROM api_keys WHERE id = %s", (key.id,)).fetchone()
        assert row is not None and secret not in row[0]
    finally:
        there_events.stop()
        there.stop()
        other_db.close()


def test_classifier_owners_hold_in_postgres(db: Database) -> None:
    from appliance.cluster.classifiers import PgClassifierStore
    from appliance.errors import NotFound
    from appliance.gateway.keys import new_key

    a, _ = new_key("a", ["predict"])
    b, _ = new_key("b", ["predict"])
    store = PgClassifierStore(db, None)
    store.create(Classifier(name="mine", labels=["x", "y"]), who=a)
    fresh = PgClassifierStore(db, None)  # another replica reads the same rows
    assert [c.name for c in fresh.list(a)] == ["mine"]
    assert fresh.list(b) == []
    with pytest.raises(NotFound):
        fresh.delete("mine", who=b)
    fresh.delete("mine", who=a)
    assert PgClassifierStore(db, None).list(a) == []


def _cluster_app(tmp: Path, models_dir: Path, env: dict[str, str], replica: str) -> TestClient:
    env = {**env, "APPLIANCE_CLUSTER__REPLICA_ID": replica}
    settings = make_settings(tmp / replica, models_dir, **env)
    client = TestClient(create_app(settings))
    client.__enter__()
    return client


def test_two_replicas_share_cache_usage_and_readiness(
    tmp_path: Path, models_dir: Path, cluster_env: dict[str, str], db: Database
) -> None:
    _, secret = PgKeyStore(db).create("k", ["predict"])
    one = _cluster_app(tmp_path, models_dir, cluster_env, "one")
    two = _cluster_app(tmp_path, models_dir, cluster_env, "two")
    try:
        headers = {"x-api-key": secret}
        body = {"text": "shared between replicas", "model": "tiny-embed"}
        first = one.post("/v1/text-vectorisation", json=body, headers=headers)
        assert first.status_code == 200 and first.headers["x-cache"] == "MISS"
        deadline, sent = time.monotonic() + 5, 1
        while True:  # the first replica's cache writer puts it into Redis behind the request
            second = two.post("/v1/text-vectorisation", json=body, headers=headers)
            sent += 1
            if second.headers["x-cache"] == "HIT" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert second.headers["x-cache"] == "HIT"
        assert second.json() == first.json() and second.headers["x-tokens-used"] == "0"
        ready = two.get("/readyz").json()
        assert ready["backends"] == {"postgres": "up", "redis": "up"}
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            answer = one.get("/v1/logs", headers=headers).json()
            logs = [e for e in answer.get("data", []) if e["endpoint"].endswith("vectorisation")]
            assert "data" in answer, answer
            if len(logs) >= sent:
                break
            time.sleep(0.1)
        # Both replicas' records, in one log: the hit (newest) and the first miss (oldest).
        assert len(logs) == sent and logs[0]["cached"] and not logs[-1]["cached"]
    finally:
        one.__exit__(None, None, None)
        two.__exit__(None, None, None)


def _cluster_config(tmp: Path, models_dir: Path, env: dict[str, str]) -> Path:
    config = tmp / "cluster.toml"
    config.write_text(
        f'data_dir = "{tmp / "data"}"\nmodels_dir = "{models_dir}"\n[cluster]\n'
        f'database_url = "{env["APPLIANCE_CLUSTER__DATABASE_URL"]}"\n'
        f'redis_url = "{env["APPLIANCE_CLUSTER__REDIS_URL"]}"\n'
    )
    return config


def test_batch_run_as_a_key_is_charged_in_postgres(
    tmp_path: Path, models_dir: Path, cluster_env: dict[str, str], db: Database
) -> None:
    import json

    from typer.testing import CliRunner

    from appliance.cli import app

    key, secret = PgKeyStore(db).create("runner", ["jobs"], token_quota=600)
    path, out = tmp_path / "in.ndjson", tmp_path / "out.ndjson"
    path.write_bytes(b"".join(b'{"text": "invoice number %d is wrong"}\n' % i for i in range(400)))
    args = ["batch", "run", str(path), "--endpoint", "/v1/text-vectorisation", "--out", str(out)]
    config = _cluster_config(tmp_path, models_dir, cluster_env)
    result = CliRunner().invoke(
        app, [*args, "--model", "tiny-embed", "--config", str(config), "--key", secret]
    )
    assert result.exit_code == 1, result.output  # the quota ran out part way
    report = json.loads(result.stderr.strip().splitlines()[-1])
    assert report["stopped"]["code"] == "INSUFFICIENT_BALANCE"
    with db.connection() as conn:
        (tokens,) = conn.execute(
            "SELECT SUM(tokens) FROM requests WHERE key_id = %s", (key.id,)
        ).fetchone()
        (spent,) = conn.execute("SELECT tokens FROM spend WHERE key_id = %s", (key.id,)).fetchone()
    assert tokens == report["tokens"] == spent > 600
    assert not (tmp_path / "data" / "usage.db").exists()  # nothing went to the local files


def test_cluster_import_moves_a_single_box_in_once(
    tmp_path: Path, models_dir: Path, cluster_env: dict[str, str], db: Database
) -> None:
    import json

    from typer.testing import CliRunner

    from appliance.cli import app
    from appliance.gateway.keys import KeyStore

    box = tmp_path / "box"
    single = TestClient(create_app(make_settings(box, models_dir)))
    with single:
        keys = KeyStore(box / "keys.json")
        _, secret = keys.create("old", ["predict"], token_quota=10_000)
        headers = {"x-api-key": secret}
        for text in ("one", "two", "three"):
            r = single.post(
                "/v1/text-vectorisation",
                json={"text": text, "model": "tiny-embed"},
                headers=headers,
            )
            assert r.status_code == 200
        saved = {"name": "tickets", "labels": ["bug", "question"], "model": "tiny-embed"}
        assert single.post("/v1/classifiers", json=saved, headers=headers).status_code == 201
        spent = single.get("/v1/balance", headers=headers).json()["spent"]
    config = _cluster_config(tmp_path, models_dir, cluster_env)
    runner = CliRunner()
    done = runner.invoke(app, ["cluster", "import", str(box), "--config", str(config)])
    assert done.exit_code == 0, done.output
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["keys"] == 1 and counts["classifiers"] == 1 and counts["requests"] >= 3
    again = runner.invoke(app, ["cluster", "import", str(box), "--config", str(config)])
    assert again.exit_code == 1 and "imported already" in again.output

    # The same secret works on a replica, with its spend, usage and classifier.
    replica = _cluster_app(tmp_path, models_dir, cluster_env, "after-import")
    try:
        headers = {"x-api-key": secret}
        assert replica.get("/v1/balance", headers=headers).json()["spent"] == spent
        usage = replica.get("/v1/usage", headers=headers).json()
        assert sum(r["requests"] for r in usage["data"] if r["model"] == "tiny-embed") == 3
        body = {"text": "it crashes", "classifier": "tickets"}
        assert replica.post("/v1/classify", json=body, headers=headers).status_code == 200
    finally:
        replica.__exit__(None, None, None)


def test_bench_section_measures_cluster_against_a_single_box(models_dir: Path) -> None:
    """The `appliance bench --systems cluster` section runs and reports its figures (a smoke
    test of the harness on the tiny model; the figures themselves are the bench's)."""
    from benchmarks.cluster import measure

    result = measure(models_dir, "tiny-embed", seconds=1, concurrency=8, rounds=2)
    assert set(result["runs"]) == {"single", "cluster"}
    for points in result["runs"].values():
        assert len(points) == 2 and all(p["requests_per_s"] > 0 and not p["errors"] for p in points)
    cluster = result["runs"]["cluster"][0]
    # One round trip before the model: the request limit, the second cache level's look-up
    # (its MGET runs inside the script) and the token charge are one script.
    calls = cluster["redis_commands_per_request"]
    assert 0.9 <= calls["evalsha"] <= 1.1 and 0.9 <= calls["mget"] <= 1.1
    assert 0.9 <= cluster["postgres_rows_per_request"] <= 1.1  # one usage record each
    assert result["cluster_vs_single"] > 0 and result["limit_script_round_trip_us"] > 0
