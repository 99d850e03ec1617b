"""Where pipelines are kept: the PipelineStore interface and its local implementation."""

from __future__ import annotations

import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol, runtime_checkable

import msgspec

from appliance.classifiers import Owner
from appliance.errors import Conflict, Forbidden, NotFound
from appliance.pipelines.spec import Pipeline, PipelineLimit, validate


class _File(msgspec.Struct):
    pipelines: list[Pipeline] = msgspec.field(default_factory=list)


# runtime_checkable: litestar checks each dependency's value against its annotation.
@runtime_checkable
class PipelineStore(Protocol):
    """Where pipelines are kept. Owner rules as for saved classifiers: a pipeline belongs to
    the key that saved it (None: an admin's, shared); a key sees its own and the shared
    ones, another key's are 404; only the owner or an admin may replace or delete one.
    `who=None` is the server itself. Calls block (files, a database): run them in a thread
    from the event loop when they write."""

    def list(self, who: Owner | None = None) -> list[Pipeline]: ...

    def get(self, name: str, who: Owner | None = None) -> Pipeline: ...

    def create(
        self, pipeline: Pipeline, *, replace: bool = False, who: Owner | None = None
    ) -> Pipeline: ...

    def delete(self, name: str, who: Owner | None = None) -> None: ...


def _admin(who: Owner | None) -> bool:
    return who is None or who.allows_scope("admin")


def visible(p: Pipeline, who: Owner | None) -> bool:
    return p.owner is None or _admin(who) or p.owner == who.id  # type: ignore[union-attr]


def not_found(name: str) -> NotFound:
    return NotFound(f"Pipeline '{name}' not found.", details={"pipeline": name})


class LocalPipelineStore:
    """One JSON file in data_dir, read once and kept in memory, written atomically (0600)."""

    def __init__(self, path: Path, *, max_per_key: int = 100) -> None:
        self.path = path
        self.max_per_key = max_per_key
        self._lock = threading.Lock()
        self._items: list[Pipeline] = self._read()

    def _read(self) -> list[Pipeline]:
        try:
            return msgspec.json.decode(self.path.read_bytes(), type=_File).pipelines
        except FileNotFoundError:
            return []

    def _write(self, items: list[Pipeline]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "wb") as fh:
            fh.write(msgspec.json.format(msgspec.json.encode(_File(items)), indent=2))
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)
        self._items = items

    def list(self, who: Owner | None = None) -> list[Pipeline]:
        with self._lock:
            return [p for p in self._items if visible(p, who)]

    def get(self, name: str, who: Owner | None = None) -> Pipeline:
        for p in self.list(who):
            if p.name == name:
                return p
        raise not_found(name)

    @staticmethod
    def _may_change(p: Pipeline, who: Owner | None) -> None:
        if not _admin(who) and p.owner != who.id:  # type: ignore[union-attr]
            raise Forbidden(
                f"Pipeline '{p.name}' is shared; only an admin key may change or delete it.",
                details={"pipeline": p.name},
            )

    def create(
        self, pipeline: Pipeline, *, replace: bool = False, who: Owner | None = None
    ) -> Pipeline:
        validate(pipeline)
        pipeline.created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        pipeline.owner = None if _admin(who) else who.id  # type: ignore[union-attr]
        with self._lock:
            items = self._items
            existing = next((p for p in items if p.name == pipeline.name), None)
            if existing is not None and not visible(existing, who):
                # Names are global: all another key may learn is that this one is taken.
                raise Conflict(
                    f"The name '{pipeline.name}' is taken; choose another.",
                    details={"pipeline": pipeline.name},
                )
            if existing is not None and not replace:
                raise Conflict(
                    f"Pipeline '{pipeline.name}' exists; delete it first or send replace=true.",
                    details={"pipeline": pipeline.name},
                )
            if existing is not None:
                self._may_change(existing, who)
                pipeline.owner = existing.owner
            elif pipeline.owner is not None:
                mine = sum(1 for p in items if p.owner == pipeline.owner)
                if mine >= self.max_per_key:
                    raise PipelineLimit(
                        f"This key has {mine} saved pipelines, the most allowed "
                        "(pipelines.max_per_key); delete one first.",
                        details={"limit": self.max_per_key},
                    )
            self._write([p for p in items if p.name != pipeline.name] + [pipeline])
        return pipeline

    def delete(self, name: str, who: Owner | None = None) -> None:
        with self._lock:
            found = next((p for p in self._items if p.name == name and visible(p, who)), None)
            if found is None:
                raise not_found(name)
            self._may_change(found, who)
            self._write([p for p in self._items if p.name != name])
