"""Safe unpacking of model zips: no absolute paths or `..`, no symlinks, no devices, a cap
on the total unpacked size and on every member's compression ratio (zip bombs). Anything
wrong is a 422 that names the member and the reason; nothing is written outside `dest`."""

from __future__ import annotations

import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath

from appliance.errors import ValidationFailed

MAX_MEMBERS = 10_000


def _refuse(reason: str, member: str | None = None) -> ValidationFailed:
    details = {"field": "body", **({"member": member} if member else {})}
    return ValidationFailed(f"Unsafe or invalid zip: {reason}", details=details)


def _check(info: zipfile.ZipInfo, max_ratio: int) -> None:
    name = info.filename
    path = PurePosixPath(name)
    if name.startswith(("/", "\\")) or path.is_absolute() or ":" in path.parts[0]:
        raise _refuse(f"{name} is an absolute path", name)
    if ".." in path.parts or "\\" in name:
        raise _refuse(f"{name} leaves the archive's folder", name)
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise _refuse(f"{name} is a symbolic link", name)
    if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise _refuse(f"{name} is not a regular file", name)
    if info.flag_bits & 0x1:
        raise _refuse(f"{name} is encrypted", name)
    if info.file_size > 1024 * 1024 and info.compress_size * max_ratio < info.file_size:
        raise _refuse(f"{name} expands more than {max_ratio}x", name)


def unpack(zip_path: Path, dest: Path, *, max_unpacked_bytes: int, max_ratio: int) -> Path:
    """Unpack into `dest` (created); returns the model's root: `dest`, or its only folder."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise _refuse(f"not a zip file ({exc})") from None
    with archive:
        members = archive.infolist()
        if not members:
            raise _refuse("the zip is empty")
        if len(members) > MAX_MEMBERS:
            raise _refuse(f"{len(members)} members; at most {MAX_MEMBERS}")
        for info in members:
            _check(info, max_ratio)
        declared = sum(i.file_size for i in members)
        if declared > max_unpacked_bytes:
            raise _refuse(f"it unpacks to {declared} bytes; at most {max_unpacked_bytes}")
        dest.mkdir(parents=True)
        written = 0
        for info in members:
            target = dest.joinpath(*PurePosixPath(info.filename).parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            # Count what is really written: a lying header cannot get past the cap.
            with archive.open(info) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    if written > max_unpacked_bytes:
                        raise _refuse(f"it unpacks to more than {max_unpacked_bytes} bytes")
                    out.write(chunk)
    entries = [p for p in dest.iterdir() if not p.name.startswith(("__MACOSX", "."))]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else dest


def discard(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
