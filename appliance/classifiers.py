"""Saved classifiers: named label sets with their model, multi-label flag and threshold, kept
in one JSON file in data_dir (written atomically, so they survive restarts and crashes)."""

from __future__ import annotations

import re

import msgspec

from appliance.errors import ValidationFailed
from appliance.owned import OwnedStore, Owner

__all__ = ["NAME", "Classifier", "ClassifierLimit", "ClassifierStore", "Owner", "validate"]

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


class ClassifierStore(OwnedStore[Classifier]):
    """Saved classifiers, with the owner rules of appliance.owned."""

    noun, field, file_type = "classifier", "classifiers", _File
    limit_error, config_key = ClassifierLimit, "classifiers.max_per_key"
    validate = staticmethod(validate)
