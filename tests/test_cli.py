"""The CLI contract scripts rely on."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from appliance.cli import app
from appliance.gateway.keys import KeyStore

runner = CliRunner()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # no ./config.toml here
    monkeypatch.setenv("APPLIANCE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("APPLIANCE_MODELS_DIR", str(tmp_path / "models"))
    return tmp_path


def test_keys_create_prints_the_key_alone_on_the_last_line(env: Path) -> None:
    result = runner.invoke(app, ["keys", "create", "--name", "ci", "--scopes", "predict,jobs"])
    assert result.exit_code == 0, result.output
    secret = result.output.strip().splitlines()[-1]
    key = KeyStore(env / "data" / "keys.json").authenticate(secret)
    assert key is not None and key.name == "ci" and key.scopes == ["predict", "jobs"]


def test_keys_list_and_revoke(env: Path) -> None:
    secret = runner.invoke(app, ["keys", "create", "--name", "a"]).output.strip().splitlines()[-1]
    listed = [json.loads(line) for line in runner.invoke(app, ["keys", "list"]).output.splitlines()]
    assert len(listed) == 1 and "hash" not in listed[0]
    assert secret not in json.dumps(listed)
    assert runner.invoke(app, ["keys", "revoke", listed[0]["id"]]).exit_code == 0
    assert KeyStore(env / "data" / "keys.json").authenticate(secret) is None
    assert runner.invoke(app, ["keys", "revoke", "key_nope"]).exit_code == 1


def test_bad_scope_is_refused(env: Path) -> None:
    result = runner.invoke(app, ["keys", "create", "--name", "x", "--scopes", "root"])
    assert result.exit_code == 2


def test_serve_with_a_bad_setting_names_it(env: Path) -> None:
    (env / "bad.toml").write_text("[server]\nprot = 80\n")
    result = runner.invoke(app, ["serve", "--config", str(env / "bad.toml")])
    assert result.exit_code == 2
    assert "prot" in result.output and "server" in result.output


def test_export_of_a_missing_folder_fails_clearly(env: Path) -> None:
    result = runner.invoke(app, ["export", str(env / "nope"), "--task", "feature-extraction"])
    assert result.exit_code == 1
    assert "not a folder" in result.output


def test_models_verify(env: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPLIANCE_MODELS_DIR", str(models_dir))
    result = runner.invoke(app, ["models", "verify"])
    assert result.exit_code == 0, result.output
    assert result.output.count("ok ") == 3


def test_export_dry_run_shows_the_plan_and_writes_nothing(
    env: Path, checkpoints: dict[str, Path]
) -> None:
    result = runner.invoke(
        app, ["export", str(checkpoints["tiny-cls"]), "--task", "text-classification", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    assert "labels" in result.output and "['ham', 'spam']" in result.output
    assert "max_tokens" in result.output and "64" in result.output
    assert not (env / "models").exists()


def test_export_names_the_supported_tasks(env: Path, checkpoints: dict[str, Path]) -> None:
    result = runner.invoke(
        app, ["export", str(checkpoints["tiny-cls"]), "--task", "astrology", "--dry-run"]
    )
    assert result.exit_code == 1
    assert "feature-extraction" in result.output and "text-generation" in result.output


def test_export_of_an_unsupported_architecture_is_clear(env: Path, tmp_path: Path) -> None:
    import json

    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "no-such-architecture", "hidden_size": 8})
    )
    result = runner.invoke(app, ["export", str(folder), "--task", "feature-extraction"])
    assert result.exit_code == 1
    assert "export failed" in result.output and "no-such-architecture" in result.output


def test_export_prints_a_validation_report(env: Path, checkpoints: dict[str, Path]) -> None:
    result = runner.invoke(
        app,
        [
            "export",
            str(checkpoints["tiny-embed"]),
            "--task",
            "feature-extraction",
            "--name",
            "report",
        ],
    )
    assert result.exit_code == 0, result.output
    for words in ("min_cosine", "size fp32 / INT8", "batch of 8", "passed"):
        assert words in result.output


def test_served_state_is_private_to_its_owner(tmp_path: Path, models_dir: Path) -> None:
    """`appliance keys` and `appliance serve` create every state file 0600 and dir 0700, even
    under a permissive umask; checked on a real server process."""
    import os
    import socket
    import stat
    import subprocess
    import time

    import httpx

    data = tmp_path / "data"
    cli = Path(sys.executable).with_name("appliance")
    env = {
        **os.environ,
        "APPLIANCE_DATA_DIR": str(data),
        "APPLIANCE_MODELS_DIR": str(models_dir),
        "HF_HUB_OFFLINE": "1",
    }
    permissive = lambda: os.umask(0o022)  # noqa: E731
    made = subprocess.run(
        [cli, "keys", "create", "--name", "k", "--scopes", "predict,jobs"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=permissive,
    )
    headers = {"x-api-key": made.stdout.strip().splitlines()[-1]}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [cli, "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=permissive,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
            body = {"text": "hi", "model": "tiny-embed"}
            assert client.post("/v1/text-vectorisation", json=body).status_code == 200
            spec = {"name": "c", "labels": ["a", "b"], "model": "tiny-embed"}
            assert client.post("/v1/classifiers", json=spec).status_code == 201
            r = client.post(
                "/v1/batch",
                params={"endpoint": "/v1/text-vectorisation", "model": "tiny-embed"},
                content=b'{"text": "hi"}\n',
                headers={"Content-Type": "application/x-ndjson"},
            )
            assert r.status_code in (201, 202), r.text
    finally:
        server.terminate()
        server.wait(30)
    paths = list(data.rglob("*"))
    names = {p.name for p in paths}
    assert {"keys.json", "usage.db", "classifiers.json"} <= names, names
    assert any(p.is_dir() and p.parent.name == "jobs" for p in paths), names
    exposed = [str(p) for p in paths if stat.S_IMODE(p.stat().st_mode) & 0o077]
    assert not exposed


def test_a_failed_export_is_one_clear_line_and_the_traceback_only_with_debug(env: Path) -> None:
    checkpoint = env / "broken"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text('{"model_type": "bert", "hidden_size": 8')
    args = ["export", str(checkpoint), "--task", "feature-extraction"]

    result = runner.invoke(app, args)
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("export failed: JSONDecodeError") and "--debug" in lines[0]
    assert str(checkpoint) in lines[0]

    result = runner.invoke(app, [*args, "--debug"])
    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.output
    assert result.output.rstrip().splitlines()[-1].startswith("export failed: JSONDecodeError")


def test_third_party_warnings_show_only_with_verbose(
    env: Path, checkpoints: dict[str, Path]
) -> None:
    """The export's tracer warnings and deprecation notices are torch's and transformers', not
    the user's to act on: hidden unless --verbose. A fresh process each time, since Python
    shows a warning once per place and the filters are process-wide."""
    import os
    import subprocess

    cli = Path(sys.executable).with_name("appliance")

    def export(*extra: str) -> str:
        done = subprocess.run(
            [cli, "export", str(checkpoints["tiny-embed"]), "--task", "feature-extraction"]
            + ["--name", f"w{len(extra)}", *extra],
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            cwd=env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    quiet, verbose = export(), export("--verbose")
    assert "TracerWarning" in verbose  # the check would be empty without something to hide
    assert "Warning" not in quiet and "deprecated" not in quiet, quiet
    assert "passed" in quiet
