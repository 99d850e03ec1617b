"""`appliance cluster import DATA_DIR`: a single box's keys, saved classifiers, usage records
and quota spend copied into PostgreSQL, so a site grows into cluster mode without re-issuing
keys. Keys whose hash is there already and classifiers whose name is taken are skipped; a
data dir is imported once (a marker file in it says when), so usage is never counted twice."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import msgspec

from appliance.classifiers import _File as ClassifierFile
from appliance.cluster.database import Database
from appliance.cluster.keys import PgKeyStore
from appliance.gateway.keys import KeyStore

MARKER = ".imported-to-cluster"


class AlreadyImported(Exception):
    pass


@dataclass
class Imported:
    keys: int = 0
    keys_skipped: int = 0
    classifiers: int = 0
    classifiers_skipped: int = 0
    requests: int = 0
    spend_keys: int = 0


def import_data_dir(db: Database, data_dir: Path, keys_file: str = "keys.json") -> Imported:
    marker = data_dir / MARKER
    if marker.exists():
        raise AlreadyImported(f"{data_dir} was imported already ({marker.read_text().strip()})")
    done = Imported()
    store = PgKeyStore(db)
    for key in KeyStore(data_dir / keys_file).list():
        if store.add(key):
            done.keys += 1
        else:
            done.keys_skipped += 1
    classifiers = data_dir / "classifiers.json"
    if classifiers.exists():
        items = msgspec.json.decode(classifiers.read_bytes(), type=ClassifierFile).classifiers
        with db.connection() as conn:
            for c in items:
                row = conn.execute(
                    "INSERT INTO classifiers (name, owner, body) VALUES (%s, %s, %s) "
                    "ON CONFLICT (name) DO NOTHING RETURNING 1",
                    (c.name, c.owner, msgspec.json.encode(c).decode()),
                ).fetchone()
                if row:
                    done.classifiers += 1
                else:
                    done.classifiers_skipped += 1
    usage = data_dir / "usage.db"
    if usage.exists():
        src = sqlite3.connect(f"file:{usage}?mode=ro", uri=True)
        try:
            rows = src.execute(
                "SELECT ts, key_id, endpoint, model, status, latency_ms, tokens, cached, "
                "request_id FROM requests ORDER BY id"
            ).fetchall()
            spend = src.execute("SELECT key_id, tokens FROM spend").fetchall()
        finally:
            src.close()
        with db.connection() as conn, conn.transaction(), conn.cursor() as cur:
            with cur.copy(
                "COPY requests (ts, key_id, endpoint, model, status, latency_ms, tokens, cached, "
                "request_id, replica) FROM STDIN"
            ) as copy:
                for r in rows:
                    copy.write_row((*r[:7], bool(r[7]), r[8], "imported"))
            cur.executemany(
                "INSERT INTO spend (key_id, tokens) VALUES (%s, %s) ON CONFLICT (key_id) "
                "DO UPDATE SET tokens = spend.tokens + excluded.tokens",
                spend,
            )
        done.requests, done.spend_keys = len(rows), len(spend)
    marker.write_text(datetime.now(timezone.utc).isoformat(timespec="seconds") + "\n")
    return done
