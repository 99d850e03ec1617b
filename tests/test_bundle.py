"""A bundle made here installs into a fresh venv with no package index and serves a model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
from typer.testing import CliRunner

from appliance.cli import app
from tests.test_imports import free_port


def test_bundle_installs_offline_and_serves(tmp_path: Path, models_dir: Path) -> None:
    out = tmp_path / "site.tar.gz"
    result = CliRunner().invoke(
        app,
        ["bundle", str(out)],
        env={"APPLIANCE_MODELS_DIR": str(models_dir), "APPLIANCE_CONFIG": ""},
    )
    assert result.exit_code == 0, result.output
    with tarfile.open(out) as tar:
        names = tar.getnames()
        tar.extractall(tmp_path / "site", filter="data")
    root = tmp_path / "site" / "appliance-bundle"
    assert {"appliance-bundle/install.sh", "appliance-bundle/config.toml"} <= set(names)
    assert (root / "models" / "tiny-embed" / "manifest.json").is_file()
    assert not any("torch" in w.name.lower() for w in (root / "wheels").iterdir())

    # No index, no pip config (this machine's config points at local mirrors): wheels only.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PIP_", "VIRTUAL_ENV", "APPLIANCE_", "PYTHONPATH"))
    }
    env |= {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PYTHON": sys.executable}
    install = subprocess.run(
        ["sh", str(root / "install.sh")], capture_output=True, text=True, env=env
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    port = free_port()
    proc = subprocess.Popen(
        [
            str(root / ".venv" / "bin" / "appliance"),
            "serve",
            "--config",
            str(root / "config.toml"),
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        key = (root / "data" / "admin.key").read_text().strip()
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/text-vectorisation",
            json={"text": "offline", "model": "tiny-embed"},
            headers={"x-api-key": key},
        )
        assert r.status_code == 200 and len(r.json()["vector"]) == 32
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
