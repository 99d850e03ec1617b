"""The CLI contract scripts rely on."""

from __future__ import annotations

import json
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
