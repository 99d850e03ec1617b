"""Named, owned records (saved classifiers, pipelines) as rows of one PostgreSQL table: the
stores keep their rules and their in-memory list, and only how a change is kept differs. A
change is applied as the difference between the list before and after it, so two replicas
changing different names never overwrite each other."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from psycopg.types.json import Jsonb

from appliance.cluster.database import Database

T = TypeVar("T", bound=msgspec.Struct)


class NamedRows:
    def __init__(self, db: Database, table: str, kind: type[Any]) -> None:
        self.db, self.table, self.kind = db, table, kind

    def read(self) -> list[Any]:
        with self.db.connection() as conn:
            rows = conn.execute(f"SELECT body FROM {self.table} ORDER BY seq").fetchall()
        return [msgspec.convert(r[0], self.kind) for r in rows]

    def apply(self, before: list[Any], after: list[Any]) -> None:
        old = {c.name: c for c in before}
        new = {c.name: c for c in after}
        with self.db.connection() as conn, conn.transaction():
            for name in old.keys() - new.keys():
                conn.execute(f"DELETE FROM {self.table} WHERE name = %s", (name,))
            for name, item in new.items():
                if old.get(name) != item:
                    conn.execute(
                        f"INSERT INTO {self.table} (name, owner, body) VALUES (%s, %s, %s) "
                        # A replaced item goes last, as in the file stores' lists.
                        "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, "
                        f"body = excluded.body, seq = nextval('{self.table}_seq_seq')",
                        (name, item.owner, Jsonb(msgspec.to_builtins(item))),
                    )
