"""The manifest of an exported model folder: what it is, its files and hashes, how it was made.

The exporter writes it; the registry refuses a folder whose files do not match it.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import os
import sys
from pathlib import Path
from typing import Any

import msgspec

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 1


class FileEntry(msgspec.Struct, kw_only=True):
    path: str
    sha256: str
    size: int


class Quantization(msgspec.Struct, kw_only=True):
    method: str = "dynamic-int8"
    preset: str = ""
    weight_type: str = "QInt8"
    per_channel: bool = True
    nodes_excluded: list[str] = msgspec.field(default_factory=list)
    """Nodes kept in fp32 because quantising them cost the most fidelity."""


class Validation(msgspec.Struct, kw_only=True):
    """Agreement of the INT8 ONNX model with the PyTorch original, measured at export."""

    samples: int
    metrics: dict[str, float]
    thresholds: dict[str, float]
    passed: bool


class Manifest(msgspec.Struct, kw_only=True, forbid_unknown_fields=False, dict=True):
    slug: str
    code: str
    name: str
    task: str
    description: str = ""
    files: dict[str, FileEntry]
    """Role to file: "model" always; "tokenizer" for text models; tasks may add roles
    (e.g. "encoder", "decoder" for seq2seq)."""
    inputs: list[str]
    outputs: list[str]
    max_tokens: int
    pad_token_id: int = 0
    labels: list[str] | None = None
    multi_label: bool = False
    dimension: int | None = None
    pooling: str | None = None
    normalize: bool = False
    example_payload: dict[str, Any] = msgspec.field(default_factory=dict)
    config: dict[str, Any] = msgspec.field(default_factory=dict)
    """Task-specific settings the runner needs (image preprocessing, generation defaults,
    special token ids, custom input/output declarations, ...)."""
    quantization: Quantization = msgspec.field(default_factory=Quantization)
    sizes: dict[str, int] = msgspec.field(default_factory=dict)
    """fp32_bytes and int8_bytes of the ONNX model."""
    validation: Validation | None = None
    exporter: dict[str, Any] = msgspec.field(default_factory=dict)
    source: str = ""
    created_at: str = ""
    schema_version: int = SCHEMA_VERSION

    @property
    def size_bytes(self) -> int:
        # Roles may share a file (a seq2seq "model" is its "encoder"): count each file once.
        return sum({f.path: f.size for f in self.files.values()}.values())

    @functools.cached_property
    def fingerprint(self) -> str:
        """Changes whenever any model file changes (used to key caches; worked out once per
        loaded manifest, as every request's cache key needs it)."""
        joined = "".join(f"{role}:{f.sha256}" for role, f in sorted(self.files.items()))
        return hashlib.sha256(joined.encode()).hexdigest()


class ManifestError(Exception):
    """The folder has no readable manifest, or its files do not match it."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entry(folder: Path, name: str) -> FileEntry:
    path = folder / name
    return FileEntry(path=name, sha256=sha256_file(path), size=path.stat().st_size)


def read_manifest(folder: Path) -> Manifest:
    path = folder / MANIFEST_FILE
    try:
        manifest = msgspec.json.decode(path.read_bytes(), type=Manifest)
    except FileNotFoundError:
        raise ManifestError(f"no {MANIFEST_FILE} in {folder}") from None
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ManifestError(f"{path}: {exc}") from None
    if manifest.schema_version > SCHEMA_VERSION:
        raise ManifestError(
            f"{path}: schema_version {manifest.schema_version} is newer than this appliance "
            f"understands ({SCHEMA_VERSION})"
        )
    for role, entry in manifest.files.items():
        inside(folder, entry.path, role)
    return manifest


def inside(folder: Path, name: str, role: str = "file") -> Path:
    """`folder / name`, refusing a name that leads out of the folder (absolute, `..`, or a
    symlink pointing elsewhere): a manifest must not make the server open /etc/passwd."""
    path = folder / name
    base = folder.resolve()
    if Path(name).is_absolute() or not path.resolve().is_relative_to(base):
        raise ManifestError(f"{role} file {name!r} is outside the model folder")
    return path


def write_manifest(folder: Path, manifest: Manifest) -> None:
    data = msgspec.json.format(msgspec.json.encode(manifest), indent=2)
    tmp = folder / (MANIFEST_FILE + ".tmp")
    tmp.write_bytes(data + b"\n")
    tmp.replace(folder / MANIFEST_FILE)


def verify(folder: Path, manifest: Manifest) -> None:
    """Raise ManifestError naming the first file that is missing or altered."""
    for role, entry in manifest.files.items():
        path = inside(folder, entry.path, role)
        if not path.is_file():
            raise ManifestError(f"{role} file {entry.path} is missing")
        if path.stat().st_size != entry.size:
            raise ManifestError(
                f"{role} file {entry.path} has {path.stat().st_size} bytes, manifest says "
                f"{entry.size}"
            )
        if sha256_file(path) != entry.sha256:
            raise ManifestError(f"{role} file {entry.path} does not match its sha256")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step with renameat2(RENAME_EXCHANGE); False where the kernel,
    libc or file system cannot (then the caller falls back to two renames)."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p] * 2 + [ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def old_folder(target: Path) -> Path:
    """Where install_folder parks the previous version of `target` between its two renames."""
    return target.with_name(f".{target.name}.old")


def install_folder(stage: Path, target: Path) -> None:
    """Swap a complete model folder in, so a reader never sees a half-written one and a
    crash never leaves the model missing: one atomic exchange where Linux offers it, else
    two renames whose crash window `recover_folders` repairs at the next start."""
    import shutil

    old = old_folder(target)
    if old.exists():
        shutil.rmtree(old)
    if target.exists() and _exchange(stage, target):
        shutil.rmtree(stage)  # now the previous version
        return
    if target.exists():
        target.rename(old)
    stage.rename(target)
    if old.exists():
        shutil.rmtree(old)


def recover_folders(models_dir: Path) -> list[str]:
    """Put back a previous model folder left hidden by a crash between install_folder's two
    renames (the live folder missing); returns the slugs restored."""
    import shutil

    restored = []
    for old in models_dir.glob(".*.old"):
        target = models_dir / old.name[1:-4]
        if not old.is_dir() or not target.name:
            continue
        if target.exists():
            shutil.rmtree(old)  # the swap completed; only the clean-up was lost
        else:
            old.rename(target)
            restored.append(target.name)
    return restored
