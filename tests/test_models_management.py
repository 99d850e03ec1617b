"""Models added, replaced and removed on a running appliance: uploads (exported folders and
checkpoints built in the background), upload URLs, the watched models folder, unsafe zips."""

from __future__ import annotations

import io
import os
import shutil
import stat
import threading
import time
import zipfile
from pathlib import Path

import pytest
from litestar.testing import TestClient

from appliance.models.builds import EXPORT_NICENESS


def zip_folder(folder: Path, prefix: str = "") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + str(path.relative_to(folder)))
    return buffer.getvalue()


def wait_status(
    client: TestClient, slug: str, headers: dict, want: set[str], timeout: float = 120
) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get(f"/v1/models/{slug}", headers=headers)
        if r.status_code == 200 and r.json()["data"]["build_status"] in want:
            return r.json()["data"]
        time.sleep(0.1)
    raise AssertionError(f"{slug} never reached {want}: {r.text}")


@pytest.fixture
def empty_app(serve, tmp_path: Path):  # type: ignore[no-untyped-def]
    models = tmp_path / "models"
    models.mkdir()
    client = serve(
        models,
        APPLIANCE_MODELS__WATCH_INTERVAL_SECONDS="0.2",
        APPLIANCE_MODELS__RETIRE_GRACE_SECONDS="0.2",
        # The load tests here would pass the default 600 requests per minute.
        APPLIANCE_LIMITS__REQUESTS_PER_MINUTE="1000000",
    )
    admin = {"x-api-key": client.keys.create("admin", ["admin"])[1]}
    return client, admin, models


def test_upload_an_exported_model_and_serve_it(empty_app, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    client, admin, models = empty_app
    r = client.post(
        "/v1/models?name=uploaded-embed&task=feature-extraction",
        content=zip_folder(models_dir / "tiny-embed", "m/"),
        headers={**admin, "Content-Type": "application/zip"},
    )
    assert r.status_code == 202, r.text
    assert r.json()["data"]["build_status"] == "building"
    data = wait_status(client, "uploaded-embed", admin, {"success", "fail"})
    assert data["build_status"] == "success", data
    out = client.post(
        "/v1/text-vectorisation", json={"text": "hi", "model": "uploaded-embed"}, headers=admin
    )
    assert out.status_code == 200 and len(out.json()["vector"]) == 32
    assert (models / "uploaded-embed" / "manifest.json").is_file()


def test_upload_a_checkpoint_builds_it_in_the_background(empty_app, checkpoints) -> None:  # type: ignore[no-untyped-def]
    client, admin, models = empty_app
    r = client.post(
        "/v1/models?name=built-cls",
        content=zip_folder(checkpoints["tiny-cls"]),
        headers={**admin, "Content-Type": "application/zip"},
    )
    assert r.status_code == 202, r.text
    building = client.get("/v1/models/built-cls", headers=admin).json()["data"]
    assert building["build_status"] in {"building", "success"}
    predict = client.post(
        "/api/v1/models/built-cls/predict", json={"input": {"text": "x"}}, headers=admin
    )
    assert predict.status_code in {200, 503}
    data = wait_status(client, "built-cls", admin, {"success", "fail"})
    assert data["build_status"] == "success", data
    assert data["task"] == "text-classification" and data["labels"] == ["ham", "spam"]
    out = client.post(
        "/api/v1/models/built-cls/predict", json={"input": {"text": "free money"}}, headers=admin
    )
    assert out.status_code == 200 and out.json()["output"]["label"] in {"ham", "spam"}


def test_a_failing_build_says_why(empty_app, checkpoints, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client, admin, _ = empty_app
    broken = tmp_path / "broken"
    shutil.copytree(checkpoints["tiny-cls"], broken)
    (broken / "model.safetensors").unlink()  # a config with no weights
    r = client.post(
        "/v1/models?name=broken-model&task=text-classification",
        content=zip_folder(broken),
        headers={**admin, "Content-Type": "application/zip"},
    )
    assert r.status_code == 202
    data = wait_status(client, "broken-model", admin, {"fail", "success"})
    assert data["build_status"] == "fail" and data["build_message"]
    assert (
        client.post(
            "/api/v1/models/broken-model/predict", json={"input": {"text": "x"}}, headers=admin
        ).status_code
        == 503
    )


def _builds(client: TestClient):  # type: ignore[no-untyped-def]
    return client.app.dependencies["builds"].dependency()


def _gone(pid: int) -> bool:
    """No process with this pid, nor any left in its process group."""
    for probe in (os.kill, os.killpg):
        try:
            probe(pid, 0)
            return False
        except ProcessLookupError:
            pass
    return True


def test_two_checkpoint_uploads_build_one_after_the_other(empty_app, checkpoints) -> None:  # type: ignore[no-untyped-def]
    client, admin, _ = empty_app
    statuses = []
    for slug, source in (("first-cls", "tiny-cls"), ("second-tags", "tiny-tags")):
        r = client.post(
            f"/v1/models?name={slug}",
            content=zip_folder(checkpoints[source]),
            headers={**admin, "Content-Type": "application/zip"},
        )
        assert r.status_code == 202, r.text
        statuses.append(r.json()["data"]["build_status"])
    assert statuses == ["building", "queued"]
    seen = set()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        now = tuple(
            client.get(f"/v1/models/{slug}", headers=admin).json()["data"]["build_status"]
            for slug in ("first-cls", "second-tags")
        )
        seen.add(now)
        assert now != ("building", "building"), "two exports ran at once"
        if now == ("success", "success"):
            break
        time.sleep(0.1)
    assert ("building", "queued") in seen and ("success", "success") in seen, seen
    uploads = client.data_dir / "uploads"
    # Zips and staging are removed as each build ends (just after its model is listed).
    deadline = time.monotonic() + 5
    while list(uploads.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(uploads.iterdir()) == []


def test_a_cancelled_build_leaves_no_exporter_running(empty_app, checkpoints) -> None:  # type: ignore[no-untyped-def]
    client, admin, models = empty_app
    builds = _builds(client)

    def upload_and_wait_for_the_exporter() -> int:
        r = client.post(
            "/v1/models?name=victim",
            content=zip_folder(checkpoints["tiny-cls"]),
            headers={**admin, "Content-Type": "application/zip"},
        )
        assert r.status_code == 202, r.text
        deadline = time.monotonic() + 30
        while "victim" not in builds.procs:
            assert time.monotonic() < deadline, "the exporter never started"
            time.sleep(0.02)
        pid: int = builds.procs["victim"].pid
        # Spawned in a session of its own (so a cancel reaches its children), then lowered
        # with os.setpriority from the server -- no preexec_fn in the threaded server.
        assert os.getsid(pid) == pid
        while os.getpriority(os.PRIO_PROCESS, pid) != EXPORT_NICENESS:
            assert time.monotonic() < deadline, os.getpriority(os.PRIO_PROCESS, pid)
            time.sleep(0.01)
        return pid

    first = upload_and_wait_for_the_exporter()
    second = upload_and_wait_for_the_exporter()  # replaces the first build
    assert second != first and _gone(first)
    r = client.delete("/v1/models/victim", headers=admin)
    assert r.status_code == 200, r.text
    assert _gone(second)
    assert "victim" not in builds.procs
    assert not (models / "victim").exists()
    assert list((client.data_dir / "uploads").iterdir()) == []


def test_stale_uploads_are_removed_at_start(serve, tmp_path: Path, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "data"
    (data / "uploads" / "0123abcd").mkdir(parents=True)
    (data / "uploads" / "0123abcd" / "config.json").write_text("{}")
    (data / "uploads" / "4567.zip").write_bytes(b"PK")
    serve(models_dir, data=data)
    assert list((data / "uploads").iterdir()) == []


def test_501_for_a_checkpoint_without_the_exporter(empty_app, checkpoints, models_dir) -> None:  # type: ignore[no-untyped-def]
    client, admin, _ = empty_app
    _builds(client).export_available = lambda: False  # a serving-only install
    r = client.post(
        "/v1/models?name=no-export",
        content=zip_folder(checkpoints["tiny-cls"]),
        headers={**admin, "Content-Type": "application/zip"},
    )
    assert r.status_code == 501, r.text
    assert r.json()["code"] == "EXPORT_UNAVAILABLE"
    assert client.get("/v1/models/no-export", headers=admin).status_code == 404
    assert list((client.data_dir / "uploads").iterdir()) == []
    # An exported model needs no exporter.
    ok = client.post(
        "/v1/models?name=exported-ok&task=feature-extraction",
        content=zip_folder(models_dir / "tiny-embed", "m/"),
        headers={**admin, "Content-Type": "application/zip"},
    )
    assert ok.status_code == 202, ok.text
    done = wait_status(client, "exported-ok", admin, {"success", "fail"})
    assert done["build_status"] == "success", done


def _zip(members: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in members:
            zf.writestr(info, data)
    return buffer.getvalue()


def _symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


@pytest.mark.parametrize(
    "body,reason",
    [
        (_zip([("../evil.txt", b"x")]), "leaves"),
        (_zip([("/etc/evil", b"x")]), "absolute"),
        (_zip([_symlink("model/link", "/etc/passwd")]), "symbolic link"),
        (_zip([("model/bomb.bin", b"\0" * 50_000_000)]), "expands"),
        (_zip([("readme.txt", b"hello")]), "neither an exported model"),
        (b"this is not a zip", "not a zip"),
        (_zip([("config.json", b"{not json")]), "config.json"),
    ],
    ids=["traversal", "absolute", "symlink", "bomb", "wrong-content", "not-zip", "bad-config"],
)
def test_unsafe_or_wrong_zips_are_422(empty_app, body: bytes, reason: str) -> None:  # type: ignore[no-untyped-def]
    client, admin, models = empty_app
    r = client.post(
        "/v1/models?name=evil-model",
        content=body,
        headers={**admin, "Content-Type": "application/zip"},
    )
    assert r.status_code == 422, r.text
    assert reason in r.json()["message"]
    assert not (models / "evil-model").exists()
    assert not (models.parent / "evil.txt").exists()


def test_upload_over_the_cap_is_413(serve, tmp_path: Path, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    client = serve(models_dir, APPLIANCE_MODELS__MAX_UPLOAD_BYTES="1000")
    admin = {"x-api-key": client.keys.create("a", ["admin"])[1]}
    r = client.post(
        "/v1/models?name=too-big",
        content=b"x" * 5000,
        headers={**admin, "Content-Type": "application/zip"},
    )
    assert r.status_code == 413
    assert not any((client.data_dir / "uploads").glob("*.zip"))  # type: ignore[attr-defined]


def test_uploads_need_admin_and_a_good_name(empty_app, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    client, admin, _ = empty_app
    predict = {"x-api-key": client.keys.create("p", ["predict"])[1]}
    body = zip_folder(models_dir / "tiny-embed")
    assert client.post("/v1/models?name=x-model", content=body, headers=predict).status_code == 403
    assert client.post("/v1/models?name=Bad Name", content=body, headers=admin).status_code == 422
    assert (
        client.post(
            "/v1/models?name=ok-name&task=astrology", content=body, headers=admin
        ).status_code
        == 422
    )


def test_upload_url_flow(empty_app, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    client, admin, _ = empty_app
    r = client.post("/upload-url", json={"model_name": "via-url"}, headers=admin)
    assert r.status_code == 200
    url = r.json()
    assert isinstance(url, str) and "/uploads/" in url
    path = url[url.index("/uploads/") :]
    put = client.put(
        path,
        content=zip_folder(models_dir / "tiny-cls"),
        headers={"Content-Type": "application/zip"},
    )
    assert put.status_code == 202, put.text
    assert wait_status(client, "via-url", admin, {"success", "fail"})["build_status"] == "success"
    again = client.put(path, content=zip_folder(models_dir / "tiny-cls"))
    assert again.status_code == 404  # one use only


def test_the_models_folder_is_watched(empty_app, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    client, admin, models = empty_app
    shutil.copytree(models_dir / "tiny-embed", models / "tiny-embed")
    data = wait_status(client, "tiny-embed", admin, {"success"}, timeout=20)
    assert data["is_active"]
    (models / "broken").mkdir()
    (models / "broken" / "manifest.json").write_text("{}")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        listed = {m["slug"]: m for m in client.get("/v1/models", headers=admin).json()["data"]}
        if "broken" in listed:
            break
        time.sleep(0.1)
    assert listed["broken"]["build_status"] == "fail" and listed["tiny-embed"]["is_active"]
    shutil.rmtree(models / "tiny-embed")
    deadline = time.monotonic() + 20
    while client.get("/v1/models/tiny-embed", headers=admin).status_code != 404:
        assert time.monotonic() < deadline, "a removed folder is still served"
        time.sleep(0.1)


def test_replacement_under_load_fails_no_request(empty_app, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    client, admin, models = empty_app
    shutil.copytree(models_dir / "tiny-embed", models / "swap")
    wait_status(client, "swap", admin, {"success"}, timeout=20)
    before = client.post(
        "/v1/text-vectorisation",
        json={"text": "probe", "model": "swap"},
        headers={**admin, "Cache-Control": "no-store"},
    ).json()["vector"]
    failures: list[object] = []
    stop = threading.Event()

    def hammer(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            r = client.post(
                "/v1/text-vectorisation",
                json={"text": f"load {n} {i}", "model": "swap"},
                headers=admin,
            )
            if r.status_code != 200:
                failures.append((r.status_code, r.text))

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        # Replace it with other weights under the same slug (the classifier's encoder).
        r = client.post(
            "/v1/models?name=swap",
            content=zip_folder(models_dir / "tiny-tags"),
            headers={**admin, "Content-Type": "application/zip"},
        )
        assert r.status_code == 202
        deadline = time.monotonic() + 30
        while (
            client.get("/v1/models/swap", headers=admin).json()["data"]["task"]
            != "text-classification"
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    # The replacement is a classifier: vectorisation is now refused, by design, with a 422.
    assert [f for f in failures if f[0] != 422] == []
    after = client.post(
        "/api/v1/models/swap/predict", json={"input": {"text": "probe"}}, headers=admin
    )
    assert after.status_code == 200 and "label" in after.json()["output"]
    assert before
