"""Saved classifiers: named label sets with their model, multi-label flag and threshold, kept
in one JSON file in data_dir (written atomically, so they survive restarts and crashes)."""

from __future__ import annotations

import os
import re
import threading
from datetime import datetime, timezone
from pathlib import Path

import msgspec

from appliance.errors import Conflict, NotFound, ValidationFailed

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class Classifier(msgspec.Struct, kw_only=True):
    name: str
    labels: list[str]
    model: str = "english"
    description: str = ""
    multi_label: bool = False
    threshold: float = 0.5
    created_at: str = ""


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


class ClassifierStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def _read(self) -> list[Classifier]:
        try:
            return msgspec.json.decode(self.path.read_bytes(), type=_File).classifiers
        except FileNotFoundError:
            return []

    def _write(self, items: list[Classifier]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(msgspec.json.format(msgspec.json.encode(_File(items)), indent=2))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def list(self) -> list[Classifier]:
        with self._lock:
            return self._read()

    def get(self, name: str) -> Classifier:
        for c in self.list():
            if c.name == name:
                return c
        raise NotFound(f"Classifier '{name}' not found.", details={"classifier": name})

    def create(self, classifier: Classifier, *, replace: bool = False) -> Classifier:
        validate(classifier)
        classifier.created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self._lock:
            items = self._read()
            existing = [c for c in items if c.name == classifier.name]
            if existing and not replace:
                raise Conflict(
                    f"Classifier '{classifier.name}' exists; delete it first or send replace=true.",
                    details={"classifier": classifier.name},
                )
            items = [c for c in items if c.name != classifier.name] + [classifier]
            self._write(items)
        return classifier

    def delete(self, name: str) -> None:
        with self._lock:
            items = self._read()
            if not any(c.name == name for c in items):
                raise NotFound(f"Classifier '{name}' not found.", details={"classifier": name})
            self._write([c for c in items if c.name != name])
