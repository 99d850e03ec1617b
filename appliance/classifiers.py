"""Saved classifiers: named label sets with their model, multi-label flag and threshold, kept
in one JSON file in data_dir (written atomically, so they survive restarts and crashes)."""

from __future__ import annotations

import os
import re
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import msgspec

from appliance.errors import Conflict, Forbidden, NotFound, ValidationFailed

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class Classifier(msgspec.Struct, kw_only=True):
    name: str
    labels: list[str]
    model: str = "english"
    description: str = ""
    multi_label: bool = False
    threshold: float = 0.5
    created_at: str = ""
    owner: str | None = None
    """The key id that saved it; None: shared (an admin's, or saved before owners existed)."""


class _File(msgspec.Struct):
    classifiers: list[Classifier] = msgspec.field(default_factory=list)


def validate(c: Classifier) -> None:
    if not NAME.match(c.name):
        raise ValidationFailed(
            "`name` must be 1-64 lowercase letters, digits, '-' or '_', starting with a letter "
            "or digit.",
            details={"field": "name"},
        )
    if not c.labels or not all(isinstance(x, str) and x.strip() for x in c.labels):
        raise ValidationFailed(
            "`labels` must be a non-empty list of non-empty strings.", details={"field": "labels"}
        )
    if len(set(c.labels)) != len(c.labels):
        raise ValidationFailed("`labels` must be distinct.", details={"field": "labels"})
    if not 0 <= c.threshold <= 1:
        raise ValidationFailed(
            "`threshold` must be between 0 and 1.", details={"field": "threshold"}
        )


class ClassifierLimit(ValidationFailed):
    code = "CLASSIFIER_LIMIT"


class Owner(Protocol):
    """Who asks: an ApiKey (its id, and whether it is an admin)."""

    id: str

    def allows_scope(self, scope: str) -> bool: ...


def _admin(who: Owner | None) -> bool:
    return who is None or who.allows_scope("admin")


class ClassifierStore:
    """Kept in memory (read once), written through to the file atomically with mode 0600.

    Each classifier has an owner: the key id that made it, or None for shared ones (made by
    an admin key, or saved before owners existed). A key sees its own and the shared ones;
    another key's private classifier is answered as if it did not exist (404), so its name
    does not leak. Only the owner or an admin may replace or delete it. `who=None` is the
    server itself (jobs re-checking a name they were already allowed)."""

    def __init__(self, path: Path, *, max_per_key: int = 100) -> None:
        self.path = path
        self.max_per_key = max_per_key
        self._lock = threading.Lock()
        self._items: list[Classifier] = self._read()

    def _read(self) -> list[Classifier]:
        try:
            return msgspec.json.decode(self.path.read_bytes(), type=_File).classifiers
        except FileNotFoundError:
            return []

    def _write(self, items: list[Classifier]) -> None:
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

    @staticmethod
    def visible(c: Classifier, who: Owner | None) -> bool:
        return c.owner is None or _admin(who) or c.owner == who.id  # type: ignore[union-attr]

    def list(self, who: Owner | None = None) -> list[Classifier]:
        with self._lock:
            return [c for c in self._items if self.visible(c, who)]

    def get(self, name: str, who: Owner | None = None) -> Classifier:
        for c in self.list(who):
            if c.name == name:
                return c
        raise NotFound(f"Classifier '{name}' not found.", details={"classifier": name})

    def _may_change(self, c: Classifier, who: Owner | None) -> None:
        if not _admin(who) and c.owner != who.id:  # type: ignore[union-attr]
            raise Forbidden(
                f"Classifier '{c.name}' is shared; only an admin key may change or delete it.",
                details={"classifier": c.name},
            )

    def create(
        self, classifier: Classifier, *, replace: bool = False, who: Owner | None = None
    ) -> Classifier:
        validate(classifier)
        classifier.created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        classifier.owner = None if _admin(who) else who.id  # type: ignore[union-attr]
        with self._lock:
            items = self._items
            existing = [c for c in items if c.name == classifier.name]
            if existing and not self.visible(existing[0], who):
                # Names are global: all we can say is that this one is taken.
                raise Conflict(
                    f"The name '{classifier.name}' is taken; choose another.",
                    details={"classifier": classifier.name},
                )
            if existing and not replace:
                raise Conflict(
                    f"Classifier '{classifier.name}' exists; delete it first or send replace=true.",
                    details={"classifier": classifier.name},
                )
            if existing:
                self._may_change(existing[0], who)
                classifier.owner = existing[0].owner
            elif classifier.owner is not None:
                mine = sum(1 for c in items if c.owner == classifier.owner)
                if mine >= self.max_per_key:
                    raise ClassifierLimit(
                        f"This key has {mine} saved classifiers, the most allowed "
                        f"(classifiers.max_per_key); delete one first.",
                        details={"limit": self.max_per_key},
                    )
            self._write([c for c in items if c.name != classifier.name] + [classifier])
        return classifier

    def delete(self, name: str, who: Owner | None = None) -> None:
        with self._lock:
            found = [c for c in self._items if c.name == name and self.visible(c, who)]
            if not found:
                raise NotFound(f"Classifier '{name}' not found.", details={"classifier": name})
            self._may_change(found[0], who)
            self._write([c for c in self._items if c.name != name])
