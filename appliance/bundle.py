"""`appliance bundle OUT.tar`: everything an air-gapped site needs to run this appliance —
a wheelhouse of the serving dependencies (for this platform, or the one given), the
appliance's own wheel, the exported models, config.toml, an empty keys file and an install
script that uses `pip install --no-index`. Made on a machine that reaches a package index."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from appliance.models.manifest import ManifestError, read_manifest, verify

INSTALL_SH = """#!/bin/sh
# Installs and starts the appliance from this bundle, with no network: run it where it lies.
set -eu
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m venv .venv
.venv/bin/pip install --no-index --find-links wheels appliance
echo "installed; start it with: $(pwd)/.venv/bin/appliance serve --config $(pwd)/config.toml"
if [ "${1:-}" = "--serve" ]; then exec .venv/bin/appliance serve --config config.toml; fi
"""

CONFIG = """# Written by `appliance bundle`. Paths are relative to this file.
data_dir = "data"
models_dir = "models"

[server]
host = "127.0.0.1"
port = 8080
"""


class BundleError(Exception):
    pass


def serving_requirements() -> list[str]:
    """The appliance's own dependencies, without any extra (so no torch)."""
    requires = importlib.metadata.requires("appliance") or []
    return [r for r in requires if "extra ==" not in r]


def _pip(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise BundleError(f"pip {args[0]} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


def make_bundle(
    out: Path,
    *,
    models_dir: Path,
    source: Path,
    platform: str | None = None,
    python_version: str | None = None,
    log: object = print,
) -> Path:
    say = log if callable(log) else print
    if not (source / "pyproject.toml").is_file():
        raise BundleError(
            f"{source} is not a source checkout of the appliance: run bundle from one"
        )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "appliance-bundle"
        wheels = root / "wheels"
        wheels.mkdir(parents=True)
        say("building the appliance wheel")
        _pip("wheel", "--no-deps", "--quiet", "-w", str(wheels), str(source))
        say("downloading serving dependencies")
        target = []
        if platform:
            target += ["--platform", platform, "--only-binary=:all:"]
        if python_version:
            target += ["--python-version", python_version, "--only-binary=:all:"]
        _pip(
            "download",
            "--quiet",
            "-d",
            str(wheels),
            *dict.fromkeys(target),
            *serving_requirements(),
        )
        say("copying models")
        models = root / "models"
        models.mkdir()
        for folder in sorted(
            p for p in models_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
        ):
            try:
                verify(folder, read_manifest(folder))
            except ManifestError as exc:
                raise BundleError(f"model {folder.name} does not verify: {exc}") from None
            shutil.copytree(folder, models / folder.name)
        (root / "config.toml").write_text(CONFIG)
        (root / "data").mkdir()
        (root / "data" / "keys.json").write_text('{"keys": []}\n')
        (root / "data" / "keys.json").chmod(0o600)
        (root / "install.sh").write_text(INSTALL_SH)
        (root / "install.sh").chmod(0o755)
        out.parent.mkdir(parents=True, exist_ok=True)
        mode = "w:gz" if re.search(r"\.(tgz|tar\.gz)$", out.name) else "w"
        with tarfile.open(out, mode) as tar:
            tar.add(root, arcname=root.name)
    say(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return out
