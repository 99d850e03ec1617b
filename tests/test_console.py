"""The console's sessions, CSRF and scopes over HTTP (no browser; tests/test_console_browser.py
drives the pages in Chromium)."""

from __future__ import annotations

import re
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from litestar.testing import TestClient

from appliance.app import create_app
from appliance.gateway.keys import KeyStore
from tests.conftest import make_settings

CSRF = re.compile(r'name="csrf" value="([^"]+)"')
PAGES = ["/console", "/console/usage", "/console/logs", "/console/playground"]
ADMIN_PAGES = ["/console/models", "/console/keys"]


@pytest.fixture
def app(tmp_path: Path) -> Callable[..., TestClient]:
    """An app on an empty models folder: the console needs no model to sign in or list keys."""
    models = tmp_path / "models"
    models.mkdir()
    settings = make_settings(tmp_path / "data", models)
    keys = KeyStore(settings.keys_path)
    clients: list[TestClient] = []

    def start(base_url: str = "http://testserver.local") -> TestClient:
        client = TestClient(create_app(settings, keys=keys), base_url=base_url)
        client.__enter__()
        client.keys = keys  # type: ignore[attr-defined]
        client.data_dir = tmp_path / "data"  # type: ignore[attr-defined]
        clients.append(client)
        return client

    yield start  # type: ignore[misc]
    for client in clients:
        client.__exit__(None, None, None)


def sign_in(client: TestClient, secret: str) -> str:
    """Signs in; returns the session's CSRF token (from a page's forms)."""
    form = client.get("/console/login")
    token = CSRF.search(form.text).group(1)  # type: ignore[union-attr]
    r = client.post("/console/login", data={"key": secret, "csrf": token}, follow_redirects=False)
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/console"
    page = client.get("/console")
    assert page.status_code == 200
    return CSRF.search(page.text).group(1)  # type: ignore[union-attr]


def test_pages_need_a_session(app: Callable[..., TestClient]) -> None:
    client = app()
    for path in PAGES + ADMIN_PAGES:
        r = client.get(path, follow_redirects=False)
        assert (r.status_code, r.headers.get("location")) == (303, "/console/login"), path
    # htmx is told where to go; scripts get the API's JSON error.
    r = client.get("/console/fragments/overview", headers={"HX-Request": "true"})
    assert (r.status_code, r.headers["hx-redirect"]) == (401, "/console/login")
    r = client.post("/console/models/upload?name=x", headers={"Accept": "application/json"})
    assert r.status_code == 401 and r.json()["code"] == "UNAUTHORIZED"


def test_sign_in_cookie_flags_and_sign_out(app: Callable[..., TestClient]) -> None:
    client = app()
    _, secret = client.keys.create("admin", ["admin"])  # type: ignore[attr-defined]
    login = client.get("/console/login")
    assert login.headers["content-security-policy"].startswith("default-src 'self'")
    token = CSRF.search(login.text).group(1)  # type: ignore[union-attr]
    r = client.post("/console/login", data={"key": secret, "csrf": token}, follow_redirects=False)
    cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith("appliance_console="))
    flags = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"httponly", "max-age", "path"} <= flags
    assert "samesite=strict" in cookie.lower()
    assert "secure" not in flags  # plain http: a Secure cookie would never come back
    assert secret not in cookie and secret.removeprefix("apl_") not in cookie
    again = client.get("/console/login", follow_redirects=False)
    assert (again.status_code, again.headers["location"]) == (303, "/console")
    csrf = CSRF.search(client.get("/console").text).group(1)  # type: ignore[union-attr]
    out = client.post("/console/logout", data={"csrf": csrf}, follow_redirects=False)
    assert out.status_code == 303
    assert client.get("/console", follow_redirects=False).status_code == 303


def test_the_cookie_is_secure_over_https(app: Callable[..., TestClient]) -> None:
    client = app("https://testserver.local")
    _, secret = client.keys.create("admin", ["admin"])  # type: ignore[attr-defined]
    token = CSRF.search(client.get("/console/login").text).group(1)  # type: ignore[union-attr]
    r = client.post("/console/login", data={"key": secret, "csrf": token}, follow_redirects=False)
    cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith("appliance_console="))
    assert "secure" in {part.strip().lower() for part in cookie.split(";")}


def test_a_wrong_key_or_a_missing_login_token_signs_no_one_in(
    app: Callable[..., TestClient],
) -> None:
    client = app()
    _, secret = client.keys.create("admin", ["admin"])  # type: ignore[attr-defined]
    token = CSRF.search(client.get("/console/login").text).group(1)  # type: ignore[union-attr]
    wrong = client.post("/console/login", data={"key": "apl_nope", "csrf": token})
    assert wrong.status_code == 401 and "unknown, revoked or expired" in wrong.text
    forged = client.post("/console/login", data={"key": secret, "csrf": "forged"})
    assert forged.status_code == 401
    assert "appliance_console=" not in "".join(forged.headers.get_list("set-cookie")).replace(
        "appliance_console_login=", ""
    )


def test_every_post_needs_the_csrf_token(app: Callable[..., TestClient]) -> None:
    client = app()
    _, secret = client.keys.create("admin", ["admin"])  # type: ignore[attr-defined]
    csrf = sign_in(client, secret)
    refused = client.post("/console/keys", data={"name": "x", "scopes": "predict"})
    assert refused.status_code == 403 and "CSRF" in refused.text
    wrong = client.post("/console/keys", data={"name": "x", "csrf": "0" * 40})
    assert wrong.status_code == 403
    by_header = client.post(
        "/console/keys", data={"name": "by-header"}, headers={"X-CSRF-Token": csrf}
    )
    assert by_header.status_code == 200 and "apl_" in by_header.text
    ok = client.post("/console/keys", data={"name": "made", "scopes": ["predict"], "csrf": csrf})
    assert ok.status_code == 200
    names = [k.name for k in client.keys.list()]  # type: ignore[attr-defined]
    assert names.count("made") == 1 and "x" not in names


def test_a_revoked_key_ends_its_session(app: Callable[..., TestClient]) -> None:
    client = app()
    key, secret = client.keys.create("ops", ["admin"])  # type: ignore[attr-defined]
    sign_in(client, secret)
    assert client.get("/console/keys").status_code == 200
    client.keys.revoke(key.id)  # type: ignore[attr-defined]
    r = client.get("/console/keys", follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (303, "/console/login")


def test_a_tampered_cookie_is_no_session(app: Callable[..., TestClient]) -> None:
    client = app()
    other, _ = client.keys.create("other", ["admin"])  # type: ignore[attr-defined]
    _, secret = client.keys.create("me", ["predict"])  # type: ignore[attr-defined]
    sign_in(client, secret)
    value = client.cookies["appliance_console"]
    _, expires, mac = value.split(".")
    client.cookies.set("appliance_console", f"{other.id}.{expires}.{mac}", path="/console")
    r = client.get("/console/keys", follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (303, "/console/login")


def test_a_predict_key_sees_its_pages_and_gets_403_on_admin_ones(
    app: Callable[..., TestClient],
) -> None:
    client = app()
    _, secret = client.keys.create("app", ["predict"])  # type: ignore[attr-defined]
    sign_in(client, secret)
    for path in PAGES:
        assert client.get(path).status_code == 200, path
    for path in ADMIN_PAGES:
        r = client.get(path)
        assert r.status_code == 403, path
        assert "scope" in r.text
    nav = client.get("/console").text
    assert 'href="/console/usage"' in nav and 'href="/console/keys"' not in nav
    # Its own jobs are visible; making one needs the jobs scope, so there is no upload form.
    jobs = client.get("/console/jobs")
    assert jobs.status_code == 200 and 'href="/console/jobs"' in nav
    assert 'id="job-upload"' not in jobs.text and "lacks the <code>jobs</code> scope" in jobs.text


def test_the_signing_secret_is_private_and_kept(app: Callable[..., TestClient]) -> None:
    client = app()
    _, secret = client.keys.create("admin", ["admin"])  # type: ignore[attr-defined]
    sign_in(client, secret)
    path = client.data_dir / "console.secret"  # type: ignore[attr-defined]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    before = path.read_text()
    restarted = app()  # a second app on the same data dir reads the same secret
    restarted.cookies = client.cookies
    assert restarted.get("/console", follow_redirects=False).status_code == 200
    assert path.read_text() == before


def test_console_routes_stay_out_of_the_openapi_document(app: Callable[..., TestClient]) -> None:
    client = app()
    _, secret = client.keys.create("admin", ["admin"])  # type: ignore[attr-defined]
    paths = client.get("/openapi.json", headers={"x-api-key": secret}).json()["paths"]
    assert paths and not [p for p in paths if p.startswith("/console")]


def test_console_pages_are_not_api_usage(app: Callable[..., TestClient]) -> None:
    client = app()
    _, secret = client.keys.create("admin", ["admin"])  # type: ignore[attr-defined]
    sign_in(client, secret)
    for path in PAGES:
        client.get(path)
    client.get("/v1/keys", headers={"x-api-key": secret})  # one API request, to wait for
    headers = {"x-api-key": secret}
    for _ in range(50):
        logged = client.get("/v1/logs", headers=headers).json()["data"]
        if logged:
            break
    assert [r["endpoint"] for r in logged if "/console" in r["endpoint"]] == []


def test_limits_and_quota_change_on_the_keys_page(app: Callable[..., TestClient]) -> None:
    client = app()
    _, secret = client.keys.create("admin", ["admin"])  # type: ignore[attr-defined]
    other, _ = client.keys.create("app", ["predict"])  # type: ignore[attr-defined]
    csrf = sign_in(client, secret)
    url = f"/console/keys/{other.id}/limits"
    r = client.post(url, data={"csrf": csrf, "requests_per_minute": "30", "token_quota": "900"})
    assert r.status_code == 200
    changed = client.keys.get(other.id)  # type: ignore[attr-defined]
    assert (changed.requests_per_minute, changed.tokens_per_minute, changed.token_quota) == (
        30,
        None,
        900,
    )
    refused = client.post(url, data={"csrf": csrf, "requests_per_minute": "0"})
    assert refused.status_code == 422 and "must be positive" in refused.text
    assert 'data-key="' + other.id + '"' in refused.text  # the table stays under the error
    assert client.keys.get(other.id).requests_per_minute == 30  # type: ignore[attr-defined]
    missing = client.post("/console/keys/key_nope/limits", data={"csrf": csrf})
    assert missing.status_code == 404


def test_a_key_that_is_not_admin_sees_only_its_own_logs(app: Callable[..., TestClient]) -> None:
    client = app()
    _, admin = client.keys.create("admin", ["admin"])  # type: ignore[attr-defined]
    mine, secret = client.keys.create("app", ["predict"])  # type: ignore[attr-defined]
    client.get("/v1/keys", headers={"x-api-key": admin})
    client.get("/v1/balance", headers={"x-api-key": secret})
    for _ in range(100):  # the usage log is written by its own thread
        if len(client.get("/v1/logs", headers={"x-api-key": admin}).json()["data"]) >= 2:
            break
    sign_in(client, secret)
    page = client.get("/console/logs").text
    assert "GET /v1/balance" in page and mine.id in page
    assert "GET /v1/keys" not in page
    usage = client.get("/console/usage").text
    assert 'id="usage-key"' not in usage  # no picking another key's usage
    client.cookies.clear()
    sign_in(client, admin)
    assert "GET /v1/keys" in client.get("/console/logs").text
    assert client.get("/console/logs?status=abc").status_code == 422
