"""Saved classifiers in PostgreSQL: the ClassifierStore rules (owners, visibility, caps)
unchanged, only where they are kept differs. Kept in memory like the file store; reloaded
before each change and when another replica announces one."""

from __future__ import annotations

from typing import Any

import msgspec
from psycopg.types.json import Jsonb

from appliance.classifiers import Classifier, ClassifierStore
from appliance.cluster.database import Database
from appliance.cluster.events import Events


class PgClassifierStore(ClassifierStore):
    def __init__(self, db: Database, events: Events | None, *, max_per_key: int = 100) -> None:
        self.db = db
        self.events = events
        super().__init__(path=None, max_per_key=max_per_key)  # type: ignore[arg-type]
        if events is not None:
            events.on("classifiers", lambda _: self.reload())

    def _read(self) -> list[Classifier]:
        with self.db.connection() as conn:
            rows = conn.execute("SELECT body FROM classifiers ORDER BY name").fetchall()
        return [msgspec.convert(r[0], Classifier) for r in rows]

    def reload(self) -> None:
        items = self._read()
        with self._lock:
            self._items = items

    def create(self, classifier: Classifier, **kwargs: Any) -> Classifier:
        self.reload()  # another replica may have saved this name meanwhile
        return super().create(classifier, **kwargs)

    def delete(self, name: str, who: Any = None) -> None:
        self.reload()
        super().delete(name, who)

    def _write(self, items: list[Classifier]) -> None:
        """Apply the change between the items in memory and `items` (a save or a delete)."""
        before = {c.name: c for c in self._items}
        after = {c.name: c for c in items}
        with self.db.connection() as conn, conn.transaction():
            for name in before.keys() - after.keys():
                conn.execute("DELETE FROM classifiers WHERE name = %s", (name,))
            for name, c in after.items():
                if before.get(name) != c:
                    conn.execute(
                        "INSERT INTO classifiers (name, owner, body) VALUES (%s, %s, %s) "
                        "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, "
                        "body = excluded.body",
                        (name, c.owner, Jsonb(msgspec.to_builtins(c))),
                    )
        self._items = items
        if self.events is not None:
            self.events.publish("classifiers")
