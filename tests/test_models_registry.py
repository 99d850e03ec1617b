"""The registry serves what verifies and reports what does not, with the reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from litestar.testing import TestClient

from appliance.config import Settings
from appliance.models.manifest import ManifestError, read_manifest, verify


@pytest.fixture
def mixed_models(tmp_path: Path, models_dir: Path) -> Path:
    """tiny-embed intact; tiny-cls with one byte of its model flipped; a folder with no manifest."""
    root = tmp_path / "models"
    root.mkdir()
    shutil.copytree(models_dir / "tiny-embed", root / "tiny-embed")
    shutil.copytree(models_dir / "tiny-cls", root / "tiny-cls")
    onnx = root / "tiny-cls" / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    (root / "stray").mkdir()
    (root / "stray" / "notes.txt").write_text("not a model")
    return root


def test_verify_names_the_altered_file(mixed_models: Path) -> None:
    folder = mixed_models / "tiny-cls"
    with pytest.raises(ManifestError, match="model.onnx"):
        verify(folder, read_manifest(folder))


def test_corrupted_model_is_reported_and_the_good_one_serves(serve, mixed_models: Path) -> None:  # type: ignore[no-untyped-def]
    client: TestClient = serve(mixed_models)
    key = client.keys.create("k", ["predict"])[1]
    headers = {"x-api-key": key}

    ready = client.get("/readyz")
    assert ready.status_code == 200
    status = {m["slug"]: m for m in ready.json()["models"]}
    assert ready.json()["status"] == "degraded"
    assert status["tiny-embed"]["status"] == "ready"
    assert status["tiny-cls"]["status"] == "fail"
    # /readyz needs no key: the reasons (paths, exception text) are only in the models API.
    assert "message" not in status["tiny-cls"] and status["stray"]["status"] == "fail"
    assert str(mixed_models) not in ready.text

    listed = {m["slug"]: m for m in client.get("/api/v1/models", headers=headers).json()["data"]}
    assert listed["tiny-cls"]["is_active"] is False
    assert listed["tiny-cls"]["build_status"] == "fail"
    detail = client.get("/api/v1/models/tiny-cls", headers=headers).json()["data"]
    assert "sha256" in detail["build_message"]

    r = client.post(
        "/api/v1/models/tiny-cls/predict", json={"input": {"text": "hi"}}, headers=headers
    )
    assert r.status_code == 503
    assert r.json()["code"] == "MODEL_UNAVAILABLE"
    assert "Retry-After" in r.headers

    r = client.post(
        "/v1/text-vectorisation", json={"text": "hi", "model": "tiny-embed"}, headers=headers
    )
    assert r.status_code == 200


def test_no_models_is_not_ready(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    empty = tmp_path / "empty"
    empty.mkdir()
    r = serve(empty).get("/readyz")
    assert r.status_code == 503
    assert r.json()["status"] == "no-models"


def test_alias_without_a_model_is_a_clear_404(serve, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    client = serve(models_dir, APPLIANCE_ALIASES__MULTILINGUAL="not-installed")
    key = client.keys.create("k", ["predict"])[1]
    r = client.post(
        "/v1/text-vectorisation",
        json={"text": "hi", "model": "multilingual"},
        headers={"x-api-key": key},
    )
    assert r.status_code == 404
    assert "not-installed" in r.json()["message"]


def test_alias_resolves_to_its_model(serve, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    client = serve(models_dir, APPLIANCE_ALIASES__ENGLISH="tiny-embed")
    key = client.keys.create("k", ["predict"])[1]
    r = client.post(
        "/text-vectorisation", json={"text": "iPhone 12 128GB"}, headers={"x-api-key": key}
    )
    assert r.status_code == 200
    assert r.headers["x-model"] == "tiny-embed"


def test_lazy_models_open_at_their_first_request(serve, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    eager: TestClient = serve(models_dir)
    lazy: TestClient = serve(models_dir, APPLIANCE_MODELS__LAZY="true")
    ready = lazy.get("/readyz")
    assert ready.status_code == 200
    status = {m["slug"]: m for m in ready.json()["models"]}
    assert status["tiny-embed"] == {"slug": "tiny-embed", "status": "ready", "loaded": False}
    assert (
        "loaded" not in {m["slug"]: m for m in eager.get("/readyz").json()["models"]}["tiny-embed"]
    )

    def vector(client: TestClient) -> list[float]:
        key = client.keys.create("k", ["predict"])[1]  # type: ignore[attr-defined]
        r = client.post(
            "/v1/text-vectorisation",
            json={"text": "open me", "model": "tiny-embed"},
            headers={"x-api-key": key, "Cache-Control": "no-store"},
        )
        assert r.status_code == 200, r.text
        return r.json()["vector"]  # type: ignore[no-any-return]

    assert vector(lazy) == pytest.approx(vector(eager), abs=1e-6)
    status = {m["slug"]: m for m in lazy.get("/readyz").json()["models"]}
    assert "loaded" not in status["tiny-embed"]  # opened now, and stays open


def test_a_lazy_model_that_cannot_open_is_a_503_then_failed(
    serve, models_dir: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    models = tmp_path / "lazy-models"
    shutil.copytree(models_dir / "tiny-embed", models / "tiny-embed")
    client: TestClient = serve(models, APPLIANCE_MODELS__LAZY="true")
    key = client.keys.create("k", ["predict"])[1]  # type: ignore[attr-defined]
    # The files verified at start; the runtime then refuses them (an unknown provider order
    # cannot break a CPU session, so break the runner's tokenizer instead).
    (models / "tiny-embed" / "tokenizer.json").write_text("{not json")
    r = client.post(
        "/v1/text-vectorisation",
        json={"text": "x", "model": "tiny-embed"},
        headers={"x-api-key": key},
    )
    assert r.status_code == 503 and r.json()["code"] == "MODEL_UNAVAILABLE"
    status = {m["slug"]: m for m in client.get("/readyz").json()["models"]}
    assert status["tiny-embed"]["status"] == "fail"


@pytest.mark.parametrize("escape", ["/etc/passwd", "../tiny-embed/model.onnx"])
def test_a_manifest_path_outside_its_folder_is_a_broken_model(  # type: ignore[no-untyped-def]
    serve, tmp_path: Path, models_dir: Path, escape: str
) -> None:
    import msgspec

    root = tmp_path / "models"
    root.mkdir()
    shutil.copytree(models_dir / "tiny-embed", root / "tiny-embed")
    shutil.copytree(models_dir / "tiny-cls", root / "tiny-cls")
    raw = msgspec.json.decode((root / "tiny-cls" / "manifest.json").read_bytes())
    raw["files"]["tokenizer"]["path"] = escape
    (root / "tiny-cls" / "manifest.json").write_bytes(msgspec.json.encode(raw))
    with pytest.raises(ManifestError, match="outside the model folder"):
        read_manifest(root / "tiny-cls")

    client: TestClient = serve(root)
    headers = {"x-api-key": client.keys.create("k", ["predict"])[1]}
    detail = client.get("/api/v1/models/tiny-cls", headers=headers).json()["data"]
    assert detail["build_status"] == "fail"
    assert "outside the model folder" in detail["build_message"]
    r = client.post(
        "/v1/text-vectorisation", json={"text": "hi", "model": "tiny-embed"}, headers=headers
    )
    assert r.status_code == 200


def test_install_folder_exchanges_the_old_version_atomically(tmp_path: Path) -> None:
    from appliance.models.manifest import _exchange, install_folder, old_folder

    target, stage = tmp_path / "m", tmp_path / ".m.stage"
    target.mkdir()
    (target / "v").write_text("1")
    stage.mkdir()
    (stage / "v").write_text("2")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").touch()
    assert _exchange(a, b), "renameat2(RENAME_EXCHANGE) is expected on this Linux host"
    assert (b / "x").exists() and not (a / "x").exists()

    install_folder(stage, target)
    assert (target / "v").read_text() == "2"
    assert not stage.exists() and not old_folder(target).exists()


def test_an_interrupted_swap_is_recovered_at_scan(serve, tmp_path: Path, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    # The crash state of the two-rename fallback: the old version parked, no live folder.
    root = tmp_path / "models"
    root.mkdir()
    shutil.copytree(models_dir / "tiny-embed", root / ".tiny-embed.old")
    client: TestClient = serve(root)
    headers = {"x-api-key": client.keys.create("k", ["predict"])[1]}
    r = client.post(
        "/v1/text-vectorisation", json={"text": "hi", "model": "tiny-embed"}, headers=headers
    )
    assert r.status_code == 200
    assert (root / "tiny-embed").is_dir() and not (root / ".tiny-embed.old").exists()


def _lone_calls_on(data_dir: Path, models_dir: Path, **env: str) -> Settings:
    """Two one-thread streams and a lone call's session of two threads, whatever the cores;
    `env`: further settings."""
    from tests.conftest import make_settings

    return make_settings(
        data_dir,
        models_dir,
        APPLIANCE_RUNTIME__STREAMS="2",
        APPLIANCE_RUNTIME__INTRA_OP_THREADS="1",
        APPLIANCE_RUNTIME__LONE_CALL_THREADS="2",
        **env,
    )


def test_a_lone_request_runs_on_a_second_session_with_every_core(
    tmp_path: Path, models_dir: Path
) -> None:
    """A text encoder's lone calls (the server answers nothing else) go to a session of their
    own with more threads; calls made side by side stay on the streams' one-thread session."""
    import asyncio

    import numpy as np

    from appliance.models.registry import Registry
    from tests.conftest import make_settings

    settings = _lone_calls_on(tmp_path / "data", models_dir)

    def counted(session: object, calls: list[int]) -> None:
        real = session.run  # type: ignore[attr-defined]

        def run(*args: object, **kwargs: object) -> object:
            calls.append(1)
            return real(*args, **kwargs)

        session.run = run  # type: ignore[attr-defined]

    async def main() -> None:
        in_flight = [1]
        registry = Registry(settings, alone=lambda: in_flight[0] <= 1)
        await registry.start()
        try:
            entry = registry.get("tiny-embed")
            assert entry.runner is not None and entry.lone is not None
            assert entry.batcher is not None
            threads = {
                "streams": entry.runner.session.get_session_options().intra_op_num_threads,
                "lone": entry.lone.session.get_session_options().intra_op_num_threads,
            }
            assert threads == {"streams": 1, "lone": 2}
            items = entry.runner.preprocess(["a short text, alone"])
            np.testing.assert_allclose(
                entry.lone.infer(items)[0], entry.runner.infer(items)[0], rtol=0, atol=1e-5
            )
            shared: list[int] = []
            own: list[int] = []
            counted(entry.runner.session, shared)
            counted(entry.lone.session, own)
            cost = [entry.runner.cost(items[0])]
            # Alone: its own session, on a model thread while how long small calls take is
            # not known yet, then on the loop.
            await entry.batcher.submit(items, cost)
            await entry.batcher.submit(items, cost)
            assert (len(shared), len(own)) == (0, 2)
            in_flight[0] = 2  # another request in progress: the streams' session
            await entry.batcher.submit(items, cost)
            assert (len(shared), len(own)) == (1, 2)
        finally:
            await registry.stop()

    asyncio.run(main())

    async def lone(settings: object, alone: object) -> object:
        registry = Registry(settings, alone=alone)  # type: ignore[arg-type]
        await registry.start()
        try:
            entry = registry.get("tiny-embed")
            assert entry.status == "ready"
            return entry.lone
        finally:
            await registry.stop()

    # No second copy of the weights where it would not be used: turned off, or a batch
    # job's process (no requests, so never a lone one).
    plain = make_settings(tmp_path / "plain", models_dir, APPLIANCE_RUNTIME__LONE_CALL_THREADS="1")
    assert asyncio.run(lone(plain, lambda: True)) is None
    assert asyncio.run(lone(settings, None)) is None


def test_a_model_serves_without_its_lone_call_session_when_that_fails_to_open(
    tmp_path: Path,
    models_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import asyncio

    from appliance.models import registry as registry_module

    real = registry_module.create_session

    def create_session(*args: object, spin: bool = False, **kwargs: object) -> object:
        if spin:
            raise MemoryError("no room for a second copy")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(registry_module, "create_session", create_session)
    settings = _lone_calls_on(tmp_path / "data", models_dir)

    async def main() -> None:
        registry = registry_module.Registry(settings, alone=lambda: True)
        await registry.start()
        try:
            entry = registry.get("tiny-embed")
            assert entry.status == "ready" and entry.lone is None
            assert entry.batcher is not None and entry.runner is not None
            items = entry.runner.preprocess(["still served"])
            for _ in range(2):  # on a model thread, then inline on the streams' session
                (vector,) = await entry.batcher.submit(items, [entry.runner.cost(items[0])])
                assert vector.shape[-1] > 0
        finally:
            await registry.stop()

    asyncio.run(main())
    assert "no session of its own for lone calls" in caplog.text


def test_a_lone_call_session_runs_where_the_model_does_and_warns_only_once(
    tmp_path: Path, models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Asked for a provider this machine lacks, a model with a lone call's session says so
    once: the second session runs on what the first one chose, not on a second choice."""
    import asyncio
    import shutil

    from appliance.models.registry import Registry

    only = tmp_path / "models"
    shutil.copytree(models_dir / "tiny-embed", only / "tiny-embed")
    settings = _lone_calls_on(
        tmp_path / "data",
        only,
        APPLIANCE_RUNTIME__PROVIDERS='["CUDAExecutionProvider", "CPUExecutionProvider"]',
    )

    async def main() -> tuple[list[str], list[str]]:
        registry = Registry(settings, alone=lambda: True)
        await registry.start()
        try:
            entry = registry.get("tiny-embed")
            assert entry.runner is not None and entry.lone is not None
            return entry.runner.session.get_providers(), entry.lone.session.get_providers()
        finally:
            await registry.stop()

    with caplog.at_level("WARNING", logger="appliance.runtime"):
        streams, lone = asyncio.run(main())
    assert lone == streams == ["CPUExecutionProvider"]
    skipped = [r for r in caplog.records if "not available here" in r.getMessage()]
    assert len(skipped) == 1, [r.getMessage() for r in skipped]
