"""infinity-emb (optimum/ONNX engine) in its own venv, set up offline from the registries with
the pins and the one-line optimum patch of shared/TOOLCHAIN.md ("Peers for benchmarks"), and
a model folder laid out the way it loads: the checkpoint's config and tokenizer, with the
appliance's own INT8 file at onnx/model_quantized.onnx and onnx/model.onnx (one file, two
names: it logs the first and loads the second)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PINS = [
    "torch==2.13.0",  # the CPU build on this machine's disk; never let pip pick another torch
    "infinity-emb[server,optimum]==0.0.78",
    "optimum[onnxruntime]==1.27.0",
    "transformers==4.48.3",
    "onnxruntime==1.31.1",
    "numpy<2",
]
PATCH_FILE = "optimum/exporters/onnx/model_patcher.py"
PATCH_OLD = "from torch.onnx.symbolic_opset14 import ("
PATCH_NEW = "from torch.onnx._internal.torchscript_exporter.symbolic_opset14 import ("
STAMP = ".bench-ready"


class SetupFailed(Exception):
    pass


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(venv: Path, log: Path) -> float:
    """Create (once) the infinity venv; returns seconds spent. Raises SetupFailed with why."""
    stamp = venv / STAMP
    if stamp.is_file() and stamp.read_text().strip() == " ".join(PINS):
        return 0.0
    start = time.perf_counter()
    if venv.exists():
        shutil.rmtree(venv)
    with log.open("a") as out:
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(venv_python(venv)), "-m", "pip", "install", "--quiet", *PINS],
        ]
        for cmd in steps:
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            rc = subprocess.run(cmd, stdout=out, stderr=out, timeout=900, check=False).returncode
            if rc != 0:
                what = " ".join(cmd[2:])
                raise SetupFailed(f"`{what}` failed (rc {rc}); see {log}")
    site = subprocess.run(
        [str(venv_python(venv)), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    target = Path(site) / PATCH_FILE
    text = target.read_text()
    if PATCH_OLD in text:
        target.write_text(text.replace(PATCH_OLD, PATCH_NEW))
    elif PATCH_NEW not in text:
        raise SetupFailed(f"optimum patch: the import to fix was not found in {target}")
    check = subprocess.run(
        [str(venv_python(venv)), "-c", "import infinity_emb, optimum.onnxruntime, torch"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"},
        check=False,
    )
    if check.returncode != 0:
        raise SetupFailed(f"infinity-emb does not import: {check.stderr.strip()[-300:]}")
    stamp.write_text(" ".join(PINS))
    return time.perf_counter() - start


def model_folder(checkpoint: Path, onnx_file: Path, out: Path) -> Path:
    """The checkpoint's config/tokenizer files plus the INT8 ONNX file, as infinity loads it."""
    if out.exists():
        shutil.rmtree(out)
    (out / "onnx").mkdir(parents=True)
    for item in checkpoint.iterdir():
        if item.is_file() and item.suffix not in {".safetensors", ".bin", ".onnx", ".h5"}:
            shutil.copy2(item, out / item.name)
        elif item.is_dir() and item.name[0].isdigit():  # 1_Pooling and the like
            shutil.copytree(item, out / item.name)
    first = out / "onnx" / "model_quantized.onnx"
    shutil.copy2(onnx_file, first)
    try:
        os.link(first, out / "onnx" / "model.onnx")
    except OSError:
        shutil.copy2(onnx_file, out / "onnx" / "model.onnx")
    return out


def command(venv: Path, model: Path, port: int, batch_size: int = 32) -> list[str]:
    return [
        str(venv / "bin" / "infinity_emb"),
        "v2",
        "--model-id",
        str(model),
        "--served-model-name",
        "bench",
        "--engine",
        "optimum",
        "--device",
        "cpu",
        "--batch-size",
        str(batch_size),
        "--pooling-method",
        "mean",
        "--no-model-warmup",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


ENV = {
    "HF_HUB_OFFLINE": "1",
    "INFINITY_ANONYMOUS_USAGE_STATS": "0",
    "INFINITY_ONNX_DISABLE_OPTIMIZE": "1",
    "DO_NOT_TRACK": "1",
}
