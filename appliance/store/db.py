"""The store's SQLite index: one file, WAL mode, one schema for every store module.

``connect(store_dir)`` opens (and creates) ``<store>/index.sqlite``. Tables belong to the
module named beside them; each module reads and writes only its own tables.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from appliance.errors import StoreError

INDEX_NAME = "index.sqlite"

SCHEMA = """
-- appliance.store.trust_state: installed trust roots (the chain, oldest first) and channels.
CREATE TABLE IF NOT EXISTS trust_roots (
    version     INTEGER PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    body        BLOB NOT NULL,
    installed_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS channels (
    name          TEXT PRIMARY KEY,
    sequence      INTEGER NOT NULL,
    manifest_hash TEXT NOT NULL,
    updated_at    TEXT NOT NULL
);
-- appliance.store.audit: append-only, hash-chained log.
CREATE TABLE IF NOT EXISTS audit (
    seq     INTEGER PRIMARY KEY,
    time    TEXT NOT NULL,
    kind    TEXT NOT NULL,
    details TEXT NOT NULL,
    prev    TEXT NOT NULL,
    hash    TEXT NOT NULL
);
"""


def connect(store_dir: Path) -> sqlite3.Connection:
    """Open the store index, creating the store directory and schema if needed."""
    try:
        store_dir.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(store_dir / INDEX_NAME, timeout=30, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.executescript(SCHEMA)
    except (OSError, sqlite3.Error) as e:
        raise StoreError(f"cannot open the store index in {store_dir}: {e}") from e
    conn.row_factory = sqlite3.Row
    return conn
