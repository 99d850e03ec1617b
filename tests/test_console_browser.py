"""The console in a real browser: Playwright drives Debian's Chromium (never a downloaded one)
against a real server (uvicorn on a free loopback port) with the tiny models.

Every page is visited with no console error and screenshotted (under the pytest temp dir;
APPLIANCE_CONSOLE_SCREENSHOTS=docs/console also copies them there, for the README), and no
request may leave 127.0.0.1."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn
from playwright import sync_api  # the dev extra; it drives /usr/bin/chromium

from appliance.app import create_app
from appliance.gateway.keys import KeyStore
from tests.conftest import make_settings
from tests.generation_models import build_tiny_gpt2
from tests.test_imports import free_port

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1000, "height": 700}
PAGES = {
    "overview": ("/console", "Overview"),
    "models": ("/console/models", "Models"),
    "keys": ("/console/keys", "API keys"),
    "usage": ("/console/usage", "Usage"),
    "logs": ("/console/logs", "Request logs"),
    "jobs": ("/console/jobs", "Batch jobs"),
    "playground": ("/console/playground", "Playground"),
}


@dataclass
class Live:
    url: str
    keys: KeyStore
    admin: str
    predict: str
    shots: Path

    def api(self, method: str, path: str, secret: str | None = None, **kw: Any) -> httpx.Response:
        headers = {"x-api-key": secret or self.admin, **kw.pop("headers", {})}
        return httpx.request(method, self.url + path, headers=headers, timeout=30, **kw)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("console")
    # A copy: the upload test adds a model to (and deletes it from) the server's models folder.
    models = shutil.copytree(models_dir, root / "models")
    from exporters.export import export_model  # a tiny GPT-2, for the playground's stream

    gpt2 = build_tiny_gpt2(root / "checkpoints" / "tiny-gpt2")
    export_model(gpt2, "text-generation", out_dir=models, slug="tiny-gpt2")
    settings = make_settings(root / "data", models, APPLIANCE_MODELS__WATCH_INTERVAL_SECONDS="0")
    keys = KeyStore(settings.keys_path)
    _, admin = keys.create("admin", ["admin"])
    _, predict = keys.create("app", ["predict"])
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, keys=keys), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, name="console-server", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    else:
        raise AssertionError("the server did not start")
    shots = root / "screenshots"
    shots.mkdir()
    live = Live(url, keys, admin, predict, shots)
    # Some traffic, so that the usage chart and the logs have something to show.
    for text in ("alpha", "beta", "alpha"):
        body = {"text": text, "model": "tiny-embed"}
        assert live.api("POST", "/v1/text-vectorisation", json=body).status_code == 200
    body = {"text": "spam?", "labels": ["ham", "spam"], "model": "tiny-embed"}
    assert live.api("POST", "/v1/text-classification", predict, json=body).status_code == 200
    assert live.api("POST", "/v1/text-vectorisation", json={"model": "tiny-embed"}).status_code
    yield live
    server.should_exit = True
    thread.join(timeout=30)
    if target := os.environ.get("APPLIANCE_CONSOLE_SCREENSHOTS"):
        Path(target).mkdir(parents=True, exist_ok=True)
        for name in ["login", *PAGES]:  # one per page (not the 403 one)
            shutil.copy(shots / f"{name}.png", Path(target) / f"{name}.png")


@pytest.fixture(scope="module")  # Playwright runs an event loop: gone before other modules
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield browser
        browser.close()


@dataclass
class Watch:
    """What a page did that it must not: console errors, uncaught errors, outside requests."""

    errors: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


@pytest.fixture
def page(browser: Any, live: Live) -> Iterator[tuple[Any, Watch]]:
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    watch = Watch()

    def route(route: Any) -> None:
        host = urlsplit(route.request.url).hostname
        if host != "127.0.0.1":
            watch.outside.append(route.request.url)
            route.abort()
        else:
            route.continue_()

    context.route("**/*", route)
    page = context.new_page()
    page.on("request", lambda r: watch.requests.append(r.url))
    page.on("console", lambda m: watch.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: watch.errors.append(str(e)))
    yield page, watch
    context.close()
    assert watch.outside == [], watch.outside
    assert all(urlsplit(u).hostname == "127.0.0.1" for u in watch.requests), watch.requests


def sign_in(page: Any, live: Live, secret: str) -> None:
    page.goto(live.url + "/console/login")
    page.get_by_label("API key").fill(secret)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(live.url + "/console")


def shoot(page: Any, live: Live, name: str) -> None:
    page.screenshot(path=str(live.shots / f"{name}.png"))


def test_sign_in_sets_a_strict_http_only_expiring_cookie(page: Any, live: Live) -> None:
    page, watch = page
    page.goto(live.url + "/console")
    assert page.url == live.url + "/console/login"  # no session: the sign-in form
    shoot(page, live, "login")
    page.get_by_label("API key").fill("apl_wrong")
    page.get_by_role("button", name="Sign in").click()
    assert "unknown, revoked or expired" in page.locator("[role=alert]").inner_text()
    watch.errors.clear()  # the 401 of the failed sign-in is logged by the browser, as it should
    sign_in(page, live, live.admin)
    (cookie,) = [c for c in page.context.cookies() if c["name"] == "appliance_console"]
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert cookie["secure"] is False  # served over plain http here (https: see test_console.py)
    assert time.time() < cookie["expires"] <= time.time() + 8 * 3600 + 5
    assert live.admin not in cookie["value"]
    assert page.evaluate("document.cookie") == ""  # HttpOnly: invisible to scripts
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(live.url + "/console/login")
    assert [c for c in page.context.cookies() if c["name"] == "appliance_console"] == []
    assert watch.errors == []


def test_create_a_key_on_the_keys_page_and_revoke_it(page: Any, live: Live) -> None:
    page, watch = page
    sign_in(page, live, live.admin)
    page.goto(live.url + "/console/keys")
    page.get_by_label("Name").fill("made-in-the-console")
    page.get_by_label("jobs").check()
    page.get_by_label("Token quota").fill("5000")
    page.get_by_role("button", name="Create key").click()
    secret = page.locator("#new-secret").input_value()
    assert secret.startswith("apl_")
    listed = {k["name"]: k for k in live.api("GET", "/v1/keys").json()["data"]}
    made = listed["made-in-the-console"]
    assert made["scopes"] == ["predict", "jobs"] and made["token_quota"] == 5000
    assert live.api("GET", "/v1/balance", secret).json()["token_quota"] == 5000
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live.url)
    page.get_by_role("button", name="Copy").click()
    page.locator(".copied", has_text="Copied.").wait_for()
    assert page.evaluate("navigator.clipboard.readText()") == secret
    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name="Revoke key made-in-the-console").click()
    page.locator(f"tr[data-key='{made['id']}'] .badge", has_text="revoked").wait_for()
    assert live.api("GET", "/v1/balance", secret).status_code == 401
    assert watch.errors == []


def test_a_predict_key_gets_403_on_the_keys_page(page: Any, live: Live) -> None:
    page, watch = page
    sign_in(page, live, live.predict)
    nav = page.get_by_role("navigation", name="Console pages")
    assert nav.get_by_role("link", name="Keys").count() == 0
    assert nav.get_by_role("link", name="Playground").count() == 1
    response = page.goto(live.url + "/console/keys")
    assert response.status == 403
    assert "needs a key with the 'admin' scope" in page.locator("[role=alert]").inner_text()
    shoot(page, live, "forbidden")
    page.goto(live.url + "/console/usage")  # its own usage: the classification it made
    assert "tiny-embed" in page.locator(".scroll table").inner_text()


def test_the_playground_runs_the_embedding_model(page: Any, live: Live) -> None:
    page, watch = page
    sign_in(page, live, live.admin)
    page.goto(live.url + "/console/playground")
    page.get_by_label("Model").select_option("tiny-embed")
    page.get_by_label("Task endpoint").select_option("/v1/text-vectorisation")
    body = json.loads(page.get_by_label("Request body (JSON)").input_value())
    assert "text" in body
    page.get_by_role("button", name="Run").click()
    answer = json.loads(page.locator("#answer").inner_text())
    assert len(answer["vector"]) == 32
    curl = page.locator("#curl").inner_text()
    assert f"{live.url}/v1/text-vectorisation" in curl and "$APPLIANCE_KEY" in curl
    # The curl command's body, sent to the API, answers the same vector.
    sent = json.loads(curl.split("-d ", 1)[1].strip().strip("'"))
    assert sent["model"] == "tiny-embed"
    direct = live.api("POST", "/v1/text-vectorisation", json=sent).json()
    assert direct["vector"] == pytest.approx(answer["vector"], abs=1e-6)
    shoot(page, live, "playground")
    assert watch.errors == []


def test_upload_a_model_zip_and_watch_it_become_ready(
    page: Any, live: Live, models_dir: Path, tmp_path: Path
) -> None:
    page, watch = page
    archive = tmp_path / "tiny-embed.zip"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in (models_dir / "tiny-embed").rglob("*"):
            if file.is_file():
                zf.write(file, f"m/{file.relative_to(models_dir / 'tiny-embed')}")
    archive.write_bytes(buffer.getvalue())
    sign_in(page, live, live.admin)
    page.goto(live.url + "/console/models")
    page.get_by_label("Name (slug)").fill("uploaded-embed")
    page.get_by_label("Zip file").set_input_files(str(archive))
    page.get_by_role("button", name="Upload").click()
    page.locator(".upload-status.ok").wait_for(timeout=30_000)
    assert page.locator("#model-progress").get_attribute("value") == "100"
    row = page.locator("tr[data-model='uploaded-embed']")
    row.locator(".badge", has_text="success").wait_for(timeout=30_000)
    assert live.api("GET", "/v1/models/uploaded-embed").json()["data"]["is_active"] is True
    shoot(page, live, "models")
    page.once("dialog", lambda d: d.accept())
    row.get_by_role("button", name="Delete model uploaded-embed").click()
    row.wait_for(state="detached", timeout=10_000)
    assert live.api("GET", "/v1/models/uploaded-embed").status_code == 404
    assert watch.errors == []


def test_submit_a_job_and_download_its_results(page: Any, live: Live, tmp_path: Path) -> None:
    page, watch = page
    lines = tmp_path / "job.ndjson"
    lines.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(3)))
    sign_in(page, live, live.admin)
    page.goto(live.url + "/console/jobs")
    page.get_by_label("Endpoint").select_option("/v1/text-vectorisation")
    page.get_by_label("Default model").select_option("tiny-embed")
    page.get_by_label("NDJSON file").set_input_files(str(lines))
    page.get_by_role("button", name="Upload").click()
    page.locator(".upload-status.ok").wait_for(timeout=30_000)
    row = page.locator("tr[data-status='completed']").first
    row.wait_for(timeout=30_000)
    job_id = row.get_attribute("data-job")
    assert live.api("GET", f"/v1/batch/{job_id}").json()["status"] == "completed"
    shoot(page, live, "jobs")
    with page.expect_download() as download:
        row.get_by_role("link", name="Results").click()
    results = [json.loads(line) for line in Path(download.value.path()).read_text().splitlines()]
    assert [r["line"] for r in results] == [0, 1, 2] or [r["line"] for r in results] == [1, 2, 3]
    assert all(r["status"] == 200 and len(r["response"]["vector"]) == 32 for r in results)
    assert watch.errors == []


def test_the_playground_streams_a_generation(page: Any, live: Live) -> None:
    page, watch = page
    sign_in(page, live, live.predict)
    page.goto(live.url + "/console/playground")
    page.get_by_label("Model").select_option("tiny-gpt2")
    assert page.get_by_label("Task endpoint").input_value() == "/v1/text-generation"
    body = {"text": "Once upon a time", "max_length": 8, "temperature": 0}
    page.get_by_label("Request body (JSON)").fill(json.dumps(body))
    page.get_by_role("button", name="Stream").click()
    page.get_by_role("heading", name=re.compile(r"^Done \(\d+ tokens\)$")).wait_for()
    streamed = page.locator("#answer").inner_text()
    whole = live.api("POST", "/v1/text-generation", json={**body, "model": "tiny-gpt2"})
    assert streamed and whole.json()["output"].endswith(streamed)
    assert watch.errors == []


@pytest.mark.parametrize("name", list(PAGES))
def test_every_page_renders_without_console_errors(
    page: Any, live: Live, name: str, request: pytest.FixtureRequest
) -> None:
    page, watch = page
    sign_in(page, live, live.admin)
    path, heading = PAGES[name]
    response = page.goto(live.url + path)
    assert response.status == 200
    assert response.headers["content-security-policy"].startswith("default-src 'self'")
    assert page.get_by_role("heading", level=1).inner_text() == heading
    link = page.get_by_role("navigation", name="Console pages").get_by_role("link", name=name)
    assert link.get_attribute("aria-current") == "page"
    if name == "usage":
        page.locator(".chart .uplot").first.wait_for()
        assert page.locator(".chart .uplot").count() == 3
    if name in ("overview", "models", "jobs"):
        page.wait_for_timeout(2500)  # one htmx poll of the live tables
    # Every input has a label (or is hidden / a button).
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea')]
             .filter(el => el.type !== 'hidden' && el.labels.length === 0
                     && !el.getAttribute('aria-label'))
             .map(el => el.name || el.id)"""
    )
    assert unlabelled == []
    if name not in ("models", "jobs", "playground"):  # those were taken with their results
        shoot(page, live, name)
    # Narrow window: the page still fits (the nav wraps, wide tables scroll in their box).
    page.set_viewport_size({"width": 380, "height": 700})
    page.wait_for_timeout(300)  # charts redraw on resize
    assert page.evaluate("document.documentElement.scrollWidth") <= 380 + 1
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    assert watch.errors == [], watch.errors
