"""Named records that belong to the key that saved them (saved classifiers, pipelines),
kept in one JSON file in data_dir: read once, held in memory, written atomically with mode
0600 (with server.workers > 1: re-read when another process replaced it, written under a
lock file). The rules are the same for every kind:

- an owner is the key id that saved it, or None for shared ones (saved by an admin key, or
  before owners existed); a key sees its own and the shared ones;
- another key's private record is answered as if it did not exist (404), so its name does
  not leak; names are global, so creating a taken name only says 409;
- only the owner or an admin may replace or delete one; at most `max_per_key` per key
  (shared ones are not counted);
- `who=None` is the server itself (jobs re-checking a name they were already allowed)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import msgspec

from appliance.errors import Conflict, Forbidden, NotFound, ValidationFailed


class Owner(Protocol):
    """Who asks: an ApiKey (its id, and whether it is an admin)."""

    id: str

    def allows_scope(self, scope: str) -> bool: ...


class Named(Protocol):
    name: str
    owner: str | None
    created_at: str


T = TypeVar("T", bound=Any)


def is_admin(who: Owner | None) -> bool:
    return who is None or who.allows_scope("admin")


class OwnedStore(Generic[T]):
    """The rules above; a kind gives its struct, its file's field, its validation and the
    error its cap raises."""

    noun: ClassVar[str]  # "classifier": error messages and details say it
    file_type: ClassVar[type[msgspec.Struct]]  # the JSON file: one list field, `field`
    field: ClassVar[str]
    limit_error: ClassVar[type[ValidationFailed]]
    config_key: ClassVar[str]  # what sets max_per_key, for the cap's message

    def __init__(self, path: Path, *, max_per_key: int = 100, shared: bool = False) -> None:
        self.path = path
        self.max_per_key = max_per_key
        self._lock = threading.Lock()
        self.shared = shared
        """Other processes (server.workers) change the file too: re-read it when it changed
        (one stat per read) and write under a lock file, from what is on disk."""
        # (Not shared: no stat at all; the cluster stores subclass this with no file.)
        self._stamp = self._file_stamp() if shared else None
        self._items: list[T] = self._read()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        # Each write replaces the file: a new inode even within one mtime tick.
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _current(self) -> list[T]:
        """The items, re-read first if another process replaced the file (shared only);
        call with self._lock held."""
        if self.shared:
            stamp = self._file_stamp()
            if stamp != self._stamp:
                self._stamp, self._items = stamp, self._read()
        return self._items

    @contextlib.contextmanager
    def _writing(self) -> Iterator[list[T]]:
        """self._lock, plus (shared) an flock on a lock file beside the file, held from the
        read to the replace, so two processes' changes cannot overwrite each other."""
        with self._lock:
            if not self.shared:
                yield self._items
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_name(f".{self.path.name}.lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    yield self._current()
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)

    @staticmethod
    def validate(item: Any) -> None:
        """Refuse (ValidationFailed) what may not be saved; the kind says what."""

    def _read(self) -> list[T]:
        try:
            data = msgspec.json.decode(self.path.read_bytes(), type=self.file_type)
        except FileNotFoundError:
            return []
        return list(getattr(data, self.field))

    def _write(self, items: list[T]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "wb") as fh:
            body = msgspec.json.encode(self.file_type(**{self.field: items}))
            fh.write(msgspec.json.format(body, indent=2))
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)
        self._items = items
        if self.shared:
            self._stamp = self._file_stamp()

    @staticmethod
    def visible(item: Named, who: Owner | None) -> bool:
        return item.owner is None or is_admin(who) or item.owner == who.id  # type: ignore[union-attr]

    def _not_found(self, name: str) -> NotFound:
        return NotFound(f"{self.noun.title()} '{name}' not found.", details={self.noun: name})

    def list(self, who: Owner | None = None) -> list[T]:
        with self._lock:
            return [c for c in self._current() if self.visible(c, who)]

    def get(self, name: str, who: Owner | None = None) -> T:
        for c in self.list(who):
            if c.name == name:
                return c
        raise self._not_found(name)

    def _may_change(self, item: Named, who: Owner | None) -> None:
        if not is_admin(who) and item.owner != who.id:  # type: ignore[union-attr]
            raise Forbidden(
                f"{self.noun.title()} '{item.name}' is shared; only an admin key may change or "
                "delete it.",
                details={self.noun: item.name},
            )

    def create(self, item: T, *, replace: bool = False, who: Owner | None = None) -> T:
        self.validate(item)
        item.created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        item.owner = None if is_admin(who) else who.id  # type: ignore[union-attr]
        with self._writing() as items:
            existing = next((c for c in items if c.name == item.name), None)
            if existing is not None and not self.visible(existing, who):
                # Names are global: all another key may learn is that this one is taken.
                raise Conflict(
                    f"The name '{item.name}' is taken; choose another.",
                    details={self.noun: item.name},
                )
            if existing is not None and not replace:
                raise Conflict(
                    f"{self.noun.title()} '{item.name}' exists; delete it first or send "
                    "replace=true.",
                    details={self.noun: item.name},
                )
            if existing is not None:
                self._may_change(existing, who)
                item.owner = existing.owner
            elif item.owner is not None:
                mine = sum(1 for c in items if c.owner == item.owner)
                if mine >= self.max_per_key:
                    raise self.limit_error(
                        f"This key has {mine} saved {self.noun}s, the most allowed "
                        f"({self.config_key}); delete one first.",
                        details={"limit": self.max_per_key},
                    )
            self._write([c for c in items if c.name != item.name] + [item])
        return item

    def delete(self, name: str, who: Owner | None = None) -> None:
        with self._writing() as items:
            found = next((c for c in items if c.name == name and self.visible(c, who)), None)
            if found is None:
                raise self._not_found(name)
            self._may_change(found, who)
            self._write([c for c in items if c.name != name])
