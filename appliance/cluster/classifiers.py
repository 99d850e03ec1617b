"""Saved classifiers and pipelines in PostgreSQL: the file stores' rules (owners, visibility,
caps) unchanged, only where they are kept differs. Kept in memory like the file stores;
reloaded before each change and when another replica announces one."""

from __future__ import annotations

from typing import Any

from appliance.classifiers import Classifier, ClassifierStore
from appliance.cluster.database import Database
from appliance.cluster.events import Events
from appliance.cluster.named import NamedRows
from appliance.pipelines import LocalPipelineStore, Pipeline


class _Shared:
    """What both stores add to their file-backed base."""

    rows: NamedRows
    events: Events | None
    kind: str
    _items: list[Any]

    def _read(self) -> list[Any]:
        return self.rows.read()

    def reload(self) -> None:
        items = self.rows.read()
        with self._lock:  # type: ignore[attr-defined]
            self._items = items

    def create(self, item: Any, **kwargs: Any) -> Any:
        self.reload()  # another replica may have saved this name meanwhile
        return super().create(item, **kwargs)  # type: ignore[misc]

    def delete(self, name: str, who: Any = None) -> None:
        self.reload()
        super().delete(name, who)  # type: ignore[misc]

    def _write(self, items: list[Any]) -> None:
        self.rows.apply(self._items, items)
        self._items = items
        if self.events is not None:
            self.events.publish(self.kind)

    def _listen(self, events: Events | None) -> None:
        self.events = events
        if events is not None:
            events.on(self.kind, lambda _: self.reload())


class PgClassifierStore(_Shared, ClassifierStore):
    kind = "classifiers"

    def __init__(self, db: Database, events: Events | None, *, max_per_key: int = 100) -> None:
        self.rows = NamedRows(db, "classifiers", Classifier)
        super().__init__(path=None, max_per_key=max_per_key)  # type: ignore[arg-type]
        self._listen(events)


class PgPipelineStore(_Shared, LocalPipelineStore):
    kind = "pipelines"

    def __init__(self, db: Database, events: Events | None, *, max_per_key: int = 100) -> None:
        self.rows = NamedRows(db, "pipelines", Pipeline)
        super().__init__(path=None, max_per_key=max_per_key)  # type: ignore[arg-type]
        self._listen(events)
