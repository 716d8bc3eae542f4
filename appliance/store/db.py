"""The store's SQLite index: one file, WAL mode, one schema for every store module.

``connect(store_dir)`` opens (and creates) ``<store>/index.sqlite``. Tables belong to the
module named beside them; each module reads and writes only its own tables.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from appliance.errors import StoreError
from appliance.store.layout import read_only_reason
from appliance.store.location import check_store_path

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
-- appliance.store (store.py, staging.py, scrub.py, records.py): the local model store.
-- Signed manifests as imported, kept so peers can re-serve them and `models show` can cite them.
CREATE TABLE IF NOT EXISTS manifests (
    hash        TEXT PRIMARY KEY,
    channel     TEXT NOT NULL,
    sequence    INTEGER NOT NULL,
    body        BLOB NOT NULL,
    signatures  TEXT NOT NULL,
    signers     TEXT NOT NULL,
    added_at    TEXT NOT NULL
);
-- One row per import of one manifest: 'partial' until every model in it is published.
CREATE TABLE IF NOT EXISTS imports (
    manifest    TEXT PRIMARY KEY REFERENCES manifests(hash),
    state       TEXT NOT NULL CHECK (state IN ('partial', 'complete', 'abandoned')),
    started_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    total_bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS models (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    version     TEXT NOT NULL,
    license     TEXT NOT NULL,
    provenance  TEXT NOT NULL,
    gguf        TEXT NOT NULL,
    manifest    TEXT NOT NULL REFERENCES manifests(hash),
    state       TEXT NOT NULL CHECK (state IN ('importing', 'published', 'quarantined')),
    started_at  TEXT NOT NULL,
    imported_at TEXT,
    UNIQUE (name, version)
);
CREATE TABLE IF NOT EXISTS files (
    id          INTEGER PRIMARY KEY,
    model       INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    path        TEXT NOT NULL,
    size        INTEGER NOT NULL,
    merkle_root TEXT NOT NULL,
    blake3      TEXT,
    state       TEXT NOT NULL CHECK (state IN ('staging', 'published', 'quarantined')),
    verified_at TEXT,
    quarantine_path TEXT,
    UNIQUE (model, path)
);
-- A file's chunk list; done = 1 once the bytes are verified and fsynced at byte_offset.
CREATE TABLE IF NOT EXISTS chunks (
    file        INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    idx         INTEGER NOT NULL,
    byte_offset INTEGER NOT NULL,
    length      INTEGER NOT NULL,
    digest      TEXT NOT NULL,
    done        INTEGER NOT NULL DEFAULT 0 CHECK (done IN (0, 1)),
    PRIMARY KEY (file, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_held ON chunks(digest) WHERE done = 1;
"""


def connect(store_dir: Path) -> sqlite3.Connection:
    """Open the store index, creating the store directory and schema if needed."""
    check_store_path(store_dir)  # a file where the store should be: say so, not "Errno 17"
    if read_only_reason(store_dir) is not None:
        return _connect_read_only(store_dir)
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


def _connect_read_only(store_dir: Path) -> sqlite3.Connection:
    """The index of a read-only store, for the read-only commands. SQLite cannot open a WAL
    database read-only without creating its -shm file, so it is opened ``immutable``: nothing
    can write through a read-only mount, and any write tried here fails as SQLITE_READONLY,
    which ``layout.os_error`` reports as a read-only store."""
    index = store_dir / INDEX_NAME
    if not index.is_file():
        raise StoreError(f"the store {store_dir} is read-only and holds no index ({index})")
    try:
        conn = sqlite3.connect(f"{index.resolve().as_uri()}?immutable=1", uri=True,
                               isolation_level=None)
        conn.execute("PRAGMA foreign_keys=ON")
    except sqlite3.Error as e:
        raise StoreError(f"cannot open the index of the read-only store {store_dir}: {e}") from e
    conn.row_factory = sqlite3.Row
    return conn
