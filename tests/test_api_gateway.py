"""Around the model call: response cache, rate limits, quotas, usage and logs, keys API."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from litestar.testing import TestClient

from appliance.gateway.ratelimit import RateLimiter
from appliance.runtime.batcher import Batcher
from appliance.workers.limits import SqliteRateLimiter
from tests.test_gateway_ratelimit import FakeClock

EMBED = "/v1/text-vectorisation"


def embed(client: TestClient, key: str, text: object, **headers: str):  # type: ignore[no-untyped-def]
    return client.post(
        EMBED, json={"text": text, "model": "tiny-embed"}, headers={"x-api-key": key, **headers}
    )


@pytest.fixture
def model_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many items reach the model, per call."""
    calls: list[int] = []
    original = Batcher.submit

    async def counting(self, items, costs, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(items))
        return await original(self, items, costs, **kwargs)

    monkeypatch.setattr(Batcher, "submit", counting)
    return calls


def wait_for(predicate, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    """The usage log is written by a background thread: poll until it caught up."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


# ---- cache ---------------------------------------------------------------------------------
def test_second_identical_request_is_a_hit_that_runs_no_model_and_costs_nothing(
    serve,
    models_dir: Path,
    model_calls: list[int],  # type: ignore[no-untyped-def]
) -> None:
    # A frozen clock: the buckets must not refill between the two requests.
    client = serve(models_dir, limiter=RateLimiter(FakeClock()))
    predict_key = client.keys.create("k", ["predict"])[1]
    first = embed(client, predict_key, "iPhone 12 128GB")
    assert first.headers["x-cache"] == "MISS"
    assert int(first.headers["x-tokens-used"]) > 0
    assert len(first.headers["x-cache-key"]) == 16
    second = embed(client, predict_key, "iPhone 12 128GB")
    assert second.status_code == 200
    assert second.headers["x-cache"] == "HIT"
    assert second.headers["x-tokens-used"] == "0"
    assert second.headers["x-cache-key"] == first.headers["x-cache-key"]
    assert int(second.headers["x-cache-age"]) >= 0
    assert second.json() == first.json()
    assert model_calls == [1]
    # A hit still counts as a request against the rate limit.
    assert int(second.headers["x-ratelimit-remaining-requests"]) < int(
        first.headers["x-ratelimit-remaining-requests"]
    )
    assert (
        second.headers["x-ratelimit-remaining-tokens"]
        == first.headers["x-ratelimit-remaining-tokens"]
    )


@pytest.mark.parametrize("scope", [None, "key", "shared"])
def test_cache_entries_are_per_key_unless_shared(serve, models_dir: Path, scope) -> None:  # type: ignore[no-untyped-def]
    # Key B must not learn from X-Cache: HIT / X-Cache-Age what key A sent (default "key").
    env = {} if scope is None else {"APPLIANCE_CACHE__SCOPE": scope}
    client = serve(models_dir, **env)
    a = client.keys.create("a", ["predict"])[1]
    b = client.keys.create("b", ["predict"])[1]
    assert embed(client, a, "a private question").headers["x-cache"] == "MISS"
    assert embed(client, a, "a private question").headers["x-cache"] == "HIT"
    other = embed(client, b, "a private question")
    assert other.status_code == 200
    if scope == "shared":
        assert other.headers["x-cache"] == "HIT" and "x-cache-age" in other.headers
    else:
        assert other.headers["x-cache"] == "MISS" and "x-cache-age" not in other.headers


def test_predict_reports_cached(client: TestClient, predict_key: str) -> None:
    body = {"input": {"text": "hello"}}
    headers = {"x-api-key": predict_key}
    assert (
        client.post("/api/v1/models/tiny-cls/predict", json=body, headers=headers).json()["meta"][
            "cached"
        ]
        is False
    )
    meta = client.post("/api/v1/models/tiny-cls/predict", json=body, headers=headers).json()["meta"]
    assert meta["cached"] is True and meta["tokens"] == 0


def test_no_cache_bypasses_lookup_but_refreshes(
    client: TestClient, predict_key: str, model_calls: list[int]
) -> None:
    embed(client, predict_key, "a")
    r = embed(client, predict_key, "a", **{"Cache-Control": "no-cache"})
    assert r.headers["x-cache"] == "BYPASS" and int(r.headers["x-tokens-used"]) > 0
    assert model_calls == [1, 1]
    assert embed(client, predict_key, "a").headers["x-cache"] == "HIT"


def test_no_store_neither_reads_nor_writes(client: TestClient, predict_key: str) -> None:
    r = embed(client, predict_key, "fresh text", **{"Cache-Control": "no-store"})
    assert r.headers["x-cache"] == "BYPASS"
    assert embed(client, predict_key, "fresh text").headers["x-cache"] == "MISS"


def test_batches_use_the_cache_per_item(
    client: TestClient, predict_key: str, model_calls: list[int]
) -> None:
    a = embed(client, predict_key, ["alpha", "beta"])
    assert a.headers["x-cache"] == "MISS"
    assert embed(client, predict_key, ["beta"]).headers["x-cache"] == "HIT"
    mixed = embed(client, predict_key, ["beta", "gamma", "alpha"])
    assert mixed.headers["x-cache"] == "MISS"
    assert model_calls == [2, 1]  # only "gamma" ran
    vectors = mixed.json()["vector"]
    assert vectors[0] == a.json()["vector"][1] and vectors[2] == a.json()["vector"][0]
    single = embed(client, predict_key, "gamma", **{"Cache-Control": "no-cache"})
    assert (
        mixed.headers["x-tokens-used"] == single.headers["x-tokens-used"]
    )  # billed for gamma only


def test_entries_expire_after_the_ttl(
    serve,
    models_dir: Path,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    import appliance.gateway.cache

    # The TTL counts from when the answer was made (the disk write comes a moment later).
    now = [time.time()]
    monkeypatch.setattr(
        appliance.gateway.cache, "time", SimpleNamespace(time=lambda: now[0], sleep=time.sleep)
    )
    client = serve(models_dir, APPLIANCE_CACHE__TTL_SECONDS="60")
    key = client.keys.create("k", ["predict"])[1]
    embed(client, key, "x")
    now[0] += 59
    assert embed(client, key, "x").headers["x-cache"] == "HIT"
    now[0] += 2
    assert embed(client, key, "x").headers["x-cache"] == "MISS"


def test_a_reexported_model_never_serves_stale_answers(
    serve,
    models_dir: Path,
    checkpoints: dict[str, Path],
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    from exporters.export import export_model

    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(models_dir / "tiny-embed", models / "tiny-embed")
    first = serve(models)
    key = first.keys.create("k", ["predict"])[1]
    before = embed(first, key, "x")
    assert embed(first, key, "x").headers["x-cache"] == "HIT"
    first.__exit__(None, None, None)
    # Same slug, other weights (the classifier's encoder), same data dir and cache.
    export_model(checkpoints["tiny-cls"], "feature-extraction", out_dir=models, slug="tiny-embed")
    second = serve(models, data=first.data_dir)
    after = embed(second, key, "x")
    assert after.headers["x-cache"] == "MISS"
    assert after.json() != before.json()


def test_a_corrupt_cache_degrades_to_miss(serve, models_dir: Path, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "corrupt-data"
    (data / "cache").mkdir(parents=True)
    (data / "cache" / "cache.db").write_bytes(b"this is not a sqlite database" * 100)
    client = serve(models_dir, data=data)
    key = client.keys.create("k", ["predict"])[1]
    r = embed(client, key, "x")
    assert r.status_code == 200 and r.headers["x-cache"] in {"MISS", "BYPASS"}
    assert "cache" in caplog.text.lower()


def test_cache_write_failures_never_fail_the_request(
    client: TestClient, predict_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import diskcache

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(diskcache.Cache, "set", full_disk)
    monkeypatch.setattr(diskcache.Cache, "get", full_disk)
    r = embed(client, predict_key, "disk is full")
    assert r.status_code == 200 and r.headers["x-cache"] == "MISS"


# ---- rate limits and quotas ----------------------------------------------------------------
@pytest.fixture(params=["memory", "workers"])
def gateway(request, serve, models_dir: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    """gateway(clock=None, **env) -> a started client, whose limits and quota spend are the
    in-memory ones of one process, or the SQLite ones server.workers > 1 shares across
    processes (the same tests hold for both)."""
    started: list[object] = []

    def start(clock: FakeClock | None = None, data: Path | None = None, **env: str) -> TestClient:
        started.append(clock)
        if request.param == "memory":
            limiter = None if clock is None else RateLimiter(clock)
            return serve(models_dir, limiter=limiter, data=data, **env)
        path = tmp_path / f"limits{len(started)}.db"
        limiter = None if clock is None else SqliteRateLimiter(path, clock)
        return serve(models_dir, limiter=limiter, data=data, APPLIANCE_SERVER__WORKERS="2", **env)

    return start


def test_over_the_request_limit_is_429_with_a_true_retry_after(gateway) -> None:  # type: ignore[no-untyped-def]
    clock = FakeClock()
    client = gateway(clock)
    key, secret = client.keys.create("slow", ["predict"], requests_per_minute=3)
    remaining = [
        embed(client, secret, f"t{i}").headers["x-ratelimit-remaining-requests"] for i in range(3)
    ]
    assert remaining == ["2", "1", "0"]
    r = embed(client, secret, "t3")
    assert r.status_code == 429
    assert r.json()["code"] == "RATE_LIMIT_EXCEEDED"
    assert r.headers["retry-after"] == "20"  # 3 per minute: one every 20 s
    assert r.headers["x-ratelimit-limit-requests"] == "3"
    clock.advance(20)
    assert embed(client, secret, "t3").status_code == 200


def test_over_the_token_limit_is_429(gateway) -> None:  # type: ignore[no-untyped-def]
    client = gateway(FakeClock())
    _, secret = client.keys.create("tokens", ["predict"], tokens_per_minute=20)
    ok = embed(client, secret, "the quick brown fox jumps over the lazy dog")  # 11 tokens
    assert ok.status_code == 200
    used = int(ok.headers["x-tokens-used"])
    assert ok.headers["x-ratelimit-remaining-tokens"] == str(20 - used)
    r = embed(client, secret, "the lazy dog jumps over the quick brown fox")
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1


def test_limits_default_from_config(gateway) -> None:  # type: ignore[no-untyped-def]
    client = gateway(
        APPLIANCE_LIMITS__REQUESTS_PER_MINUTE="7",
        APPLIANCE_LIMITS__TOKENS_PER_MINUTE="999",
    )
    _, secret = client.keys.create("k", ["predict"])
    r = embed(client, secret, "x")
    assert r.headers["x-ratelimit-limit-requests"] == "7"
    assert r.headers["x-ratelimit-limit-tokens"] == "999"
    assert int(r.headers["x-ratelimit-reset"]) >= int(time.time())


def test_concurrent_clients_never_exceed_the_bucket(gateway) -> None:  # type: ignore[no-untyped-def]
    client = gateway(FakeClock())
    _, secret = client.keys.create("shared", ["predict"], requests_per_minute=25)
    statuses: list[int] = []
    lock = threading.Lock()

    def hammer(n: int) -> None:
        for i in range(10):
            status = embed(client, secret, f"client {n} text {i}").status_code
            with lock:
                statuses.append(status)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(statuses) == 80
    assert statuses.count(200) == 25
    assert statuses.count(429) == 55


def test_quota_spent_is_402_and_balance_shows_it(gateway) -> None:  # type: ignore[no-untyped-def]
    client = gateway()
    _, secret = client.keys.create("metered", ["predict"], token_quota=12)
    first = embed(client, secret, "hello there")
    spent = int(first.headers["x-tokens-used"])
    assert embed(client, secret, "hello there").headers["x-cache"] == "HIT"  # free
    balance = client.get("/v1/balance", headers={"x-api-key": secret}).json()
    assert balance["token_quota"] == 12 and balance["spent"] == spent
    assert balance["remaining"] == 12 - spent
    statuses = [embed(client, secret, f"new text number {i}").status_code for i in range(5)]
    assert 402 in statuses
    r = embed(client, secret, "yet another different text here")
    assert r.status_code == 402 and r.json()["code"] == "INSUFFICIENT_BALANCE"
    assert client.get("/v1/balance", headers={"x-api-key": secret}).json()["spent"] <= 12


def test_spend_survives_a_restart(gateway) -> None:  # type: ignore[no-untyped-def]
    first = gateway()
    _, secret = first.keys.create("metered", ["predict"], token_quota=1000)
    used = int(embed(first, secret, "remember me").headers["x-tokens-used"])
    first.__exit__(None, None, None)
    second = gateway(data=first.data_dir)
    assert second.get("/v1/balance", headers={"x-api-key": secret}).json()["spent"] == used


# ---- usage and logs ------------------------------------------------------------------------
def model_rows(client: TestClient, key: str, expected: int) -> list[dict]:
    """Usage rows of inference requests, once the background writer has recorded `expected`."""

    def rows() -> list[dict] | None:
        data = client.get("/v1/usage", headers={"x-api-key": key}).json()["data"]
        found = [r for r in data if r["model"]]
        return found if sum(r["requests"] for r in found) >= expected else None

    result = wait_for(rows)
    assert result, "the usage log never caught up"
    return result


def test_a_full_usage_queue_drops_at_once_and_counts_it(tmp_path: Path) -> None:
    """record() runs on the event loop: with the writer behind, it must not wait (it waited
    up to a second), and what it drops shows in /metrics."""
    from appliance.gateway.usage import Record, UsageLog
    from appliance.metrics import Metrics

    log = UsageLog(tmp_path / "usage.db", retention_days=1, max_pending=2)  # writer not started
    metrics = Metrics()
    metrics.watch_usage(lambda: log.dropped)
    record = Record(time.time(), "k", "POST /x", None, 200, 1.0, 0, False, "r")
    started = time.perf_counter()
    for _ in range(5):
        log.record(record)
    assert time.perf_counter() - started < 0.05
    assert log.dropped == 3
    assert b"appliance_usage_records_dropped_total 3.0" in metrics.render()


def test_usage_totals_equal_the_tokens_the_responses_reported(
    client: TestClient, predict_key: str
) -> None:
    headers = {"x-api-key": predict_key}
    responses = [
        embed(client, predict_key, t) for t in ["a b c", "d e", ["f", "g h i"], "a b c", "j"]
    ]
    responses += [
        client.post("/api/v1/models/tiny-cls/predict", json={"input": {"text": t}}, headers=headers)
        for t in ["k l", "m"]
    ]
    reported = sum(int(r.headers["x-tokens-used"]) for r in responses)
    rows = model_rows(client, predict_key, len(responses))
    assert sum(r["tokens"] for r in rows) == reported
    by_model = {r["model"]: r for r in rows}
    assert (
        by_model["tiny-embed"]["requests"] == 5 and by_model["tiny-embed"]["cached_requests"] == 1
    )
    assert by_model["tiny-cls"]["requests"] == 2


def test_logs_record_each_request_and_are_scoped_to_the_key(
    client: TestClient, admin_key: str
) -> None:
    _, mine = client.keys.create("mine", ["predict"])  # type: ignore[attr-defined]
    _, other = client.keys.create("other", ["predict"])  # type: ignore[attr-defined]
    ok = embed(client, mine, "logged", **{"X-Request-ID": "trace-1"})
    embed(client, mine, 42)  # 422
    embed(client, other, "someone else")
    model_rows(client, admin_key, 2)
    logs = wait_for(
        lambda: (
            (b := client.get("/v1/logs", headers={"x-api-key": mine}).json())["data"]
            and len([r for r in b["data"] if r["endpoint"].endswith(EMBED)]) >= 2
            and b
        )
    )
    rows = [r for r in logs["data"] if r["endpoint"].endswith(EMBED)]
    assert {r["status"] for r in rows} == {200, 422}
    first = next(r for r in rows if r["status"] == 200)
    assert first["request_id"] == "trace-1" == ok.headers["x-request-id"]
    assert first["model"] == "tiny-embed" and first["tokens"] == int(ok.headers["x-tokens-used"])
    assert set(first) == {
        "time",
        "key_id",
        "endpoint",
        "model",
        "status",
        "latency_ms",
        "tokens",
        "cached",
        "request_id",
    }
    assert len({r["key_id"] for r in logs["data"]}) == 1  # never the other key's rows
    assert client.get("/v1/logs?key_id=someone", headers={"x-api-key": mine}).status_code == 403

    everyone = client.get("/v1/logs?limit=1000", headers={"x-api-key": admin_key}).json()["data"]
    assert len({r["key_id"] for r in everyone if r["key_id"]}) >= 2
    only_errors = client.get("/v1/logs?status=422", headers={"x-api-key": admin_key}).json()["data"]
    assert only_errors and all(r["status"] == 422 for r in only_errors)
    page = client.get("/v1/logs?limit=1", headers={"x-api-key": admin_key}).json()
    assert len(page["data"]) == 1 and page["has_more"] and page["next_offset"] == 1


def test_unauthenticated_requests_are_logged_without_a_key(
    client: TestClient, admin_key: str
) -> None:
    client.post(EMBED, json={"text": "x"})
    rows = wait_for(
        lambda: [
            r
            for r in client.get("/v1/logs?status=401", headers={"x-api-key": admin_key}).json()[
                "data"
            ]
        ]
    )
    assert rows and rows[0]["key_id"] is None


# ---- keys API ------------------------------------------------------------------------------
def test_keys_api_create_use_list_revoke(client: TestClient, admin_key: str) -> None:
    admin = {"x-api-key": admin_key}
    r = client.post(
        "/v1/keys",
        json={
            "name": "svc",
            "scopes": ["predict"],
            "models": ["tiny-embed"],
            "requests_per_minute": 100,
            "tokens_per_minute": 5000,
            "token_quota": 100000,
            "expires_at": "2099-01-01T00:00:00Z",
        },
        headers=admin,
    )
    assert r.status_code == 201, r.text
    created = r.json()
    secret = created.pop("key")
    assert (
        created["name"] == "svc"
        and created["models"] == ["tiny-embed"]
        and created["token_quota"] == 100000
    )
    assert "hash" not in created
    assert embed(client, secret, "hello").status_code == 200
    listed = client.get("/v1/keys", headers=admin).json()["data"]
    assert created["id"] in {k["id"] for k in listed}
    assert secret not in str(listed)
    assert client.delete(f"/v1/keys/{created['id']}", headers=admin).json() == {
        "id": created["id"],
        "revoked": True,
    }
    assert embed(client, secret, "hello").status_code == 401
    assert client.delete("/v1/keys/key_nope", headers=admin).status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        {"name": "x", "scopes": ["root"]},
        {"scopes": ["predict"]},
        {"name": "x", "token_quota": -1},
        {"name": "x", "colour": "blue"},
        {"name": "x", "models": []},  # once every model; now refused
        {"name": "x" * 201},  # every listing (console, CLI, /v1/keys) shows it
    ],
)
def test_keys_api_validates(client: TestClient, admin_key: str, body: dict) -> None:
    r = client.post("/v1/keys", json=body, headers={"x-api-key": admin_key})
    assert r.status_code == 422


def test_a_key_without_models_may_use_all_and_one_with_a_list_only_those(
    client: TestClient, admin_key: str
) -> None:
    admin = {"x-api-key": admin_key}
    every = client.post("/v1/keys", json={"name": "a", "models": None}, headers=admin).json()
    assert every["models"] == ["*"]
    one = client.post("/v1/keys", json={"name": "b", "models": ["tiny-cls"]}, headers=admin)
    assert embed(client, one.json()["key"], "hi").status_code == 403
    assert embed(client, every["key"], "hi").status_code == 200


def test_keys_api_needs_admin(client: TestClient, predict_key: str) -> None:
    assert client.get("/v1/keys", headers={"x-api-key": predict_key}).status_code == 403
    assert (
        client.post("/v1/keys", json={"name": "x"}, headers={"x-api-key": predict_key}).status_code
        == 403
    )


def test_a_bad_authorization_header_is_judged_even_beside_a_good_x_api_key(
    client: TestClient, admin_key: str
) -> None:
    good = {"x-api-key": admin_key}
    assert client.get("/v1/keys", headers=good).status_code == 200
    for header in ("Bearer nope", "Basic " + admin_key, admin_key, "Bearer "):
        r = client.get("/v1/keys", headers={**good, "Authorization": header})
        assert r.status_code == 401, (header, r.text)
    ok = client.get("/v1/keys", headers={"Authorization": f"bearer {admin_key}"})
    assert ok.status_code == 200


def test_an_offset_past_64_bits_is_a_client_error(client: TestClient, admin_key: str) -> None:
    """Found by schemathesis: SQLite's integers are 64-bit, a larger offset was a 500."""
    r = client.get("/v1/logs?offset=7135662278826906353664", headers={"x-api-key": admin_key})
    assert r.status_code in (400, 422), r.text
    assert r.json()["details"]


def test_a_status_filter_past_64_bits_is_a_client_error(client: TestClient, admin_key: str) -> None:
    """Found by the long schemathesis run: a status past SQLite's 64-bit integers was a 500."""
    headers = {"x-api-key": admin_key}
    r = client.get("/v1/logs?status=3901956993109103476736", headers=headers)
    assert r.status_code == 422, r.text
    assert r.json()["details"]["field"] == "status"
    assert client.get("/v1/logs?status=99", headers=headers).status_code == 422
    assert client.get("/v1/logs?status=200", headers=headers).status_code == 200


def test_secrets_never_reach_disk_or_logs(client: TestClient, admin_key: str, caplog) -> None:  # type: ignore[no-untyped-def]
    _, secret = client.keys.create("k", ["predict"])  # type: ignore[attr-defined]
    embed(client, secret, "hello")
    client.post(EMBED, json={"text": "x"}, headers={"x-api-key": secret + "-wrong"})
    model_rows(client, admin_key, 1)
    for path in Path(client.data_dir).rglob("*"):  # type: ignore[attr-defined]
        if path.is_file():
            data = path.read_bytes()
            assert secret.encode() not in data and admin_key.encode() not in data, path
    assert secret not in caplog.text


def test_limits_changed_by_the_cli_apply_to_a_running_server(client: TestClient) -> None:
    from typer.testing import CliRunner

    from appliance.cli import app

    key, secret = client.keys.create("k", ["predict"], requests_per_minute=100)  # type: ignore[attr-defined]
    assert embed(client, secret, "a").headers["x-ratelimit-limit-requests"] == "100"
    env = {
        "APPLIANCE_DATA_DIR": str(client.data_dir),
        "APPLIANCE_CONFIG": str(client.data_dir / "config.toml"),
    }  # type: ignore[attr-defined]
    result = CliRunner().invoke(
        app,
        ["keys", "set-limits", key.id, "--requests-per-minute", "5", "--token-quota", "50"],
        env=env,
    )
    assert result.exit_code == 0, result.output
    r = embed(client, secret, "b")
    assert r.headers["x-ratelimit-limit-requests"] == "5"
    assert client.get("/v1/balance", headers={"x-api-key": secret}).json()["token_quota"] == 50


@pytest.mark.parametrize("kind", ["UsageLog", "SharedUsageLog"])
def test_quota_spend_survives_kill_9(tmp_path: Path, kind: str) -> None:
    """Spend is committed as it is reserved, not by the usage queue: a process killed -9
    right after charging (its queue never written) still counts it after a restart."""
    import signal
    import subprocess
    import sys

    from appliance.gateway.usage import UsageLog
    from appliance.workers.limits import SharedUsageLog

    path = tmp_path / "usage.db"
    module = "gateway.usage" if kind == "UsageLog" else "workers.limits"
    child = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        f"from appliance.{module} import {kind} as UsageLog\n"
        f"log = UsageLog(Path({str(path)!r}), retention_days=1)\n"
        "log.start()\n"
        "log.reserve('key_a', 1000, 300)\n"
        "log.refund('key_a', 50)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", child], cwd=Path(__file__).parent.parent)
    assert done.returncode == -signal.SIGKILL
    log = (UsageLog if kind == "UsageLog" else SharedUsageLog)(path, retention_days=1)
    log.start()
    try:
        assert log.spent("key_a") == 250
    finally:
        log.stop()
