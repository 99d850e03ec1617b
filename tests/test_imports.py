"""`appliance serve` runs with torch, transformers and optimum made unimportable — and, on a
single box (no [cluster] settings), without the PostgreSQL and Redis clients too."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx

BLOCKED = ("torch", "transformers", "optimum", "psycopg", "psycopg_pool", "redis")

BLOCKER = textwrap.dedent(
    f"""
    import importlib.abc, sys

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {BLOCKED!r}:
                raise ImportError(name + " is blocked: the server must not import it")

    sys.meta_path.insert(0, Blocker())
    from appliance.cli import app
    app(sys.argv[1:], prog_name="appliance")
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_modules_import_none_of_the_export_stack() -> None:
    code = (
        "import sys, appliance.app, appliance.cli, appliance.tasks, appliance.models.registry; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {BLOCKED!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_serve_works_without_torch(tmp_path: Path, models_dir: Path) -> None:
    script = tmp_path / "serve_blocked.py"
    script.write_text(BLOCKER)
    config = tmp_path / "config.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\nmodels_dir = "{models_dir}"\n')
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("APPLIANCE_CONFIG", None)
    proc = subprocess.Popen(
        [sys.executable, str(script), "serve", "--config", str(config), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        ready = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert ready is not None and ready.status_code == 200, (
            proc.stdout.read() if proc.poll() is not None else ""
        )
        key = (tmp_path / "data" / "admin.key").read_text().strip()
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/text-vectorisation",
            json={"text": "hello", "model": "tiny-embed"},
            headers={"x-api-key": key},
        )
        assert r.status_code == 200 and len(r.json()["vector"]) == 32
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status tells why.
    assert proc.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output
    assert "is blocked" not in output
