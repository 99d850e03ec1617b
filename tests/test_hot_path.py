"""The hot routes' direct path (appliance.api.hot_path) against litestar's own route.

Two apps on the same models and the same keys, one answering plain requests on the direct
path and one with it turned off, get the same requests in the same order: every answer
(status, body, headers), every usage record and every request metric must be the same. A spy
says which requests the direct path answered, so a case that should take it (or be handed to
litestar) cannot pass by taking the other way."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from appliance.api.hot_path import HOT
from appliance.gateway.ratelimit import RateLimiter

SECRETS = {
    "predict": "sk-hot-predict-0000000000000000",
    "admin": "sk-hot-admin-00000000000000000000",
    "jobs": "sk-hot-jobs-000000000000000000000",
    "limited": "sk-hot-limited-000000000000000000",
    "quota": "sk-hot-quota-00000000000000000000",
    "cls-only": "sk-hot-clsonly-000000000000000000",
}
# Headers that differ between two apps by construction: ids and clocks (the cache key holds
# the key's id, which each app drew itself).
UNEQUAL = {"x-request-id", "x-ratelimit-reset", "x-cache-age", "x-cache-key", "date"}


class Pair:
    """The same request to both apps; `direct` counts the answers of the direct path (the
    requests it took and did not hand to litestar)."""

    def __init__(self, direct: TestClient, litestar: TestClient) -> None:
        self.direct, self.litestar = direct, litestar
        litestar.app.hot = None  # type: ignore[attr-defined]
        self.answered = 0
        path = direct.app.hot  # type: ignore[attr-defined]
        observed, handed = path._observed, path._litestar

        async def taken(scope: Any, receive: Any, send: Any) -> None:
            self.answered += 1
            await observed(scope, receive, send)

        async def handed_over(scope: Any, receive: Any, send: Any) -> None:
            self.answered -= 1
            await handed(scope, receive, send)

        path._observed, path._litestar = taken, handed_over

    def send(self, method: str, url: str, *, hot: bool, **kwargs: Any) -> Any:
        """`chunks`: a body sent in these pieces (no Content-Length)."""
        chunks = kwargs.pop("chunks", None)
        before = self.answered
        a = self.direct.request(method, url, **_body_of(chunks, kwargs))
        assert self.answered - before == (1 if hot else 0), f"direct path taken: {not hot}"
        b = self.litestar.request(method, url, **_body_of(chunks, kwargs))
        assert a.status_code == b.status_code, (a.text, b.text)
        assert _body(a) == _body(b)
        assert _headers(a) == _headers(b)
        assert a.headers.get("x-request-id")
        return a


def _body_of(chunks: list[bytes] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    return kwargs if chunks is None else {**kwargs, "content": iter(chunks)}


def _body(response: Any) -> Any:
    try:
        body = response.json()
    except json.JSONDecodeError:
        return response.content
    if isinstance(body, dict):
        body.pop("request_id", None)
    return body


def _headers(response: Any) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k not in UNEQUAL}


def _frozen() -> RateLimiter:
    """A limiter whose clock stands still: the remaining counts cannot refill between the
    two apps' answers."""
    return RateLimiter(lambda: 1_000_000.0)


@pytest.fixture
def pair(serve: Callable[..., TestClient], models_dir: Path) -> Iterator[Pair]:
    env = {"APPLIANCE_SERVER__MAX_BODY_BYTES": "20000"}
    clients = [serve(models_dir, limiter=_frozen(), **env) for _ in range(2)]
    for client in clients:
        keys = client.keys  # type: ignore[attr-defined]
        keys.create("predict", ["predict"], secret=SECRETS["predict"])
        keys.create("admin", ["admin"], secret=SECRETS["admin"])
        keys.create("jobs", ["jobs"], secret=SECRETS["jobs"])
        keys.create("limited", ["predict"], requests_per_minute=2, secret=SECRETS["limited"])
        keys.create("quota", ["predict"], token_quota=3, secret=SECRETS["quota"])
        keys.create("cls", ["predict"], models=["tiny-cls"], secret=SECRETS["cls-only"])
    yield Pair(*clients)


def auth(name: str = "predict", **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[name]}", **headers}


VALID = {
    "/v1/text-vectorisation": {"text": "a plain text", "model": "tiny-embed"},
    "/text-vectorisation": {"text": ["one", "two"], "model": "tiny-embed"},
    "/v1/text-classification": {
        "text": "win a prize",
        "labels": ["ham", "spam"],
        "model": "tiny-cls",
    },
    "/text-classification": {"text": ["a", "b"], "labels": ["x", "y"], "model": "tiny-embed"},
    "/v1/emotion": {"text": "so glad", "model": "tiny-embed", "threshold": 0.01},
    "/emotion": {"text": ["so very glad", "so sad"], "model": "tiny-embed"},
    "/v1/embeddings": {"input": ["three", "four"], "model": "tiny-embed", "dimensions": 8},
    "/embed": {"inputs": "a text", "model": "tiny-embed", "normalize": False},
}


def test_every_hot_path_but_qa_answers_as_litestar_does_first_miss_then_hit(pair: Pair) -> None:
    assert set(VALID) | {"/v1/qa", "/qa"} == set(HOT)
    for path, body in VALID.items():
        first = pair.send("POST", path, json=body, headers=auth(), hot=True)
        assert first.status_code == 200, first.text
        assert first.headers["x-cache"] == "MISS"
        again = pair.send("POST", path, json=body, headers=auth(), hot=True)
        assert again.headers["x-cache"] == "HIT"
    # The client's own request id and cache directives are read the same way.
    sent = pair.send(
        "POST",
        "/v1/text-vectorisation",
        json=VALID["/v1/text-vectorisation"],
        headers=auth(**{"X-Request-ID": "client-id-1", "Cache-Control": "no-cache"}),
        hot=True,
    )
    assert sent.headers["x-request-id"] == "client-id-1"
    assert sent.headers["x-cache"] == "BYPASS"  # no-cache: not read, written again


def test_qa_answers_as_litestar_does(
    serve: Callable[..., TestClient], qa_model: tuple[Path, Path]
) -> None:
    models = qa_model[1]
    p = Pair(serve(models, limiter=_frozen()), serve(models, limiter=_frozen()))
    for client in (p.direct, p.litestar):
        client.keys.create("predict", ["predict"], secret=SECRETS["predict"])  # type: ignore[attr-defined]
    body = {
        "question": "Where is the cat?",
        "context": "The cat sat on the mat in Paris.",
        "model": "tiny-qa",
    }
    for path in ("/v1/qa", "/qa"):
        assert p.send("POST", path, json=body, headers=auth(), hot=True).status_code == 200


def test_errors_raised_on_the_direct_path_are_litestars_errors(pair: Pair) -> None:
    text = VALID["/v1/text-vectorisation"]
    # (change to the body, headers, status, taken by the direct path)
    cases: list[tuple[dict[str, Any], dict[str, str], int, bool]] = [
        # Refused by the key: litestar's, before the body is read (as its hook does).
        ({}, {}, 401, False),
        ({}, {"Authorization": "Bearer sk-nobody"}, 401, False),
        ({}, {"Authorization": "Basic abc"}, 401, False),
        ({}, auth("jobs"), 403, False),  # no predict scope
        ({}, {"x-api-key": SECRETS["predict"]}, 200, True),
        ({"model": "no-such-model"}, auth(), 404, True),
        ({"model": "tiny-embed"}, auth("cls-only"), 403, True),  # a key for other models
        ({"text": "word " * 500, "truncate": False}, auth(), 422, True),  # the model call's
        ({"text": ["x"] * 1001}, auth(), 422, True),  # the endpoint's: over max_batch_items
        ({"text": []}, auth(), 422, False),  # the body type's own constraint: litestar's
        ({"text": ["x"] * 10_000}, auth(), 413, False),  # over the body limit
    ]
    for change, headers, status, hot in cases:
        got = pair.send(
            "POST", "/v1/text-vectorisation", json={**text, **change}, headers=headers, hot=hot
        )
        assert got.status_code == status, (change, headers, got.text)
        if status >= 400:
            assert got.json()["code"] and got.json()["request_id"] == got.headers["x-request-id"]
    # A token quota spent, then a rate limit hit: 402, then 429 with Retry-After.
    for _ in range(3):
        pair.send("POST", "/v1/text-vectorisation", json=text, headers=auth("quota"), hot=True)
    statuses = []
    for _ in range(3):
        got = pair.send(
            "POST", "/v1/text-vectorisation", json=text, headers=auth("limited"), hot=True
        )
        statuses.append(got.status_code)
    assert statuses == [200, 200, 429]
    assert int(got.headers["retry-after"]) >= 1


def test_what_litestar_decides_is_handed_to_it_with_the_body_already_read(pair: Pair) -> None:
    path, text = "/v1/text-vectorisation", VALID["/v1/text-vectorisation"]
    raw = json.dumps(text).encode()
    json_type = {"Content-Type": "application/json"}
    handed: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", path, {"content": b"{not json", "headers": auth(**json_type)}),
        ("POST", path, {"content": b"", "headers": auth(**json_type)}),
        ("POST", path, {"content": b"[1, 2]", "headers": auth(**json_type)}),
        ("POST", path, {"json": {"text": 5, "model": "tiny-embed"}, "headers": auth()}),
        ("POST", path, {"json": {"model": "tiny-embed"}, "headers": auth()}),  # no text
        # litestar coerces what a strict decode refuses: the same answer either way.
        ("POST", path, {"json": {**text, "truncate": "false"}, "headers": auth()}),
        ("POST", path, {"content": b"[" * 5000 + b"]" * 5000, "headers": auth(**json_type)}),
        # A field the body type lacks: decoded straight into the type it would be skipped
        # unread, where litestar refuses a broken number or string in it (400) or ignores it.
        ("POST", path, {"content": raw[:-1] + b', "x": 1e99999}', "headers": auth(**json_type)}),
        ("POST", path, {"content": raw[:-1] + b', "x": "\xff\xfe"}', "headers": auth(**json_type)}),
        ("POST", path, {"json": {**text, "x": 1}, "headers": auth()}),
        # Not JSON by its type, a body in chunks over the limit, a query, a trailing slash.
        ("POST", path, {"content": raw, "headers": auth(**{"Content-Type": "text/plain"})}),
        ("POST", path, {"content": raw, "headers": auth()}),  # no Content-Type at all
        ("POST", path, {"chunks": [raw[:5], b" " * 30000, raw[5:]], "headers": auth(**json_type)}),
        ("POST", path + "?x=1", {"json": text, "headers": auth()}),
        ("POST", path + "/", {"json": text, "headers": auth()}),
        ("POST", path, {"json": text, "headers": auth(Host="bad host\x01")}),
        ("PUT", path, {"json": text, "headers": auth()}),
        ("GET", path, {"headers": auth()}),
    ]
    for method, url, kwargs in handed:
        got = pair.send(method, url, hot=False, **kwargs)
        assert got.status_code != 500, (url, kwargs, got.text)
    # A body in chunks within the limit is read whole by the direct path.
    chunked = pair.send(
        "POST", path, chunks=[raw[:5], raw[5:]], headers=auth(**json_type), hot=True
    )
    assert chunked.status_code == 200


def test_usage_records_and_metrics_are_the_same_on_both_paths(pair: Pair) -> None:
    for path, body in VALID.items():
        pair.send("POST", path, json=body, headers=auth(), hot=True)
    text = VALID["/v1/text-vectorisation"]
    pair.send("POST", "/v1/text-vectorisation", json=text, headers={}, hot=False)  # a 401
    pair.send("POST", "/v1/text-vectorisation", content=b"{", headers=auth(), hot=False)
    # A bad Host is refused by litestar's router, before any route: not recorded.
    bad_host = auth(Host="bad host\x01")
    pair.send("POST", "/v1/text-vectorisation", json=text, headers=bad_host, hot=False)

    def records(client: TestClient) -> list[tuple[Any, ...]]:
        client.app.state.services.inference.usage.flush()  # type: ignore[attr-defined]
        logs = client.get("/v1/logs?limit=100", headers=auth("admin")).json()
        rows = logs["data"] if isinstance(logs, dict) else logs
        return sorted(
            (r["endpoint"], r["status"], r["model"], r["tokens"], r["cached"]) for r in rows
        )

    def counters(client: TestClient) -> list[str]:
        text = client.get("/metrics", headers=auth("admin")).text
        return sorted(
            line
            for line in text.splitlines()
            if line.startswith(
                ("appliance_requests_total{", "appliance_cache_", "appliance_tokens")
            )
            and "_created" not in line
            and "/metrics" not in line
            and "/v1/logs" not in line
        )

    assert records(pair.direct) == records(pair.litestar)
    assert len(records(pair.direct)) >= len(VALID) + 2
    assert counters(pair.direct) == counters(pair.litestar)
    assert any('endpoint="POST /v1/text-vectorisation"' in c for c in counters(pair.direct))


def test_a_request_without_a_key_is_refused_before_its_body_is_read(
    tmp_path: Path, models_dir: Path
) -> None:
    """As litestar's before_request hook does: a client sending `Expect: 100-continue` with no
    key gets its 401 at once, not a 100 Continue and a wait for a body nobody will read."""
    from appliance.app import create_app
    from appliance.gateway.keys import KeyStore
    from tests.conftest import make_settings
    from tests.test_request_path import _serving

    settings = make_settings(tmp_path / "data", models_dir)
    keys = KeyStore(settings.keys_path)
    keys.create("predict", ["predict"], secret=SECRETS["predict"])
    with _serving(create_app(settings, keys=keys)) as (_, base):
        host, port = base.removeprefix("http://").split(":")
        for credential, first_line in (
            ("", b"HTTP/1.1 401 "),
            (f"Authorization: Bearer {SECRETS['predict']}\r\n", b"HTTP/1.1 100 "),
        ):
            with socket.create_connection((host, int(port)), timeout=5) as conn:
                conn.sendall(
                    f"POST /v1/text-vectorisation HTTP/1.1\r\nHost: {host}\r\n{credential}"
                    "Content-Type: application/json\r\nContent-Length: 40\r\n"
                    "Expect: 100-continue\r\n\r\n".encode()
                )
                assert conn.recv(4096).startswith(first_line)


def test_a_content_length_of_other_digits_is_left_to_litestar(pair: Pair) -> None:
    """`str.isdigit` is true for '²', which int() refuses: the length must be ASCII digits.
    (uvicorn's parser refuses such a header first; other ASGI servers may not.)"""
    hot = pair.direct.app.hot  # type: ignore[attr-defined]
    route = hot.route(
        {"type": "http", "method": "POST", "path": "/v1/text-vectorisation", "headers": []}
    )

    async def receive() -> dict[str, Any]:
        raise AssertionError("the body is not read")

    for length in (b"\xb2", b"12a", b"-1", b"20001"):
        scope = {
            "type": "http",
            "headers": [(b"content-type", b"application/json"), (b"content-length", length)],
        }
        assert asyncio.run(hot._read(scope, receive, route)) == ([], None)
