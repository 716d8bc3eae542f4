"""The read side of an open store index: where verified chunks live, what a host offers.

``StoreCatalog`` wraps one index connection and answers the queries readers ask (the server,
a peer serving chunks, a torrent seeding from the store): every local copy of a chunk and its
bytes re-checked against the hash, the digests held, recorded manifests and those a peer
offers, imports still under way, a file's chunk list, and the model records of
``appliance.store.records``. It writes nothing. ``appliance.store.store.Store`` extends it with
the writes (transactions, audit records, import bookkeeping, staging, removal), so a writer
reads through the same methods.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Self

from appliance.store import layout
from appliance.store.db import connect
from appliance.store.records import ModelRecord, find_model, list_models
from appliance.store.specs import LocalChunk, read_local_copy
from appliance.store.staging import StoredChunk


class StoreCatalog:
    """One open store index, for reading: ``with StoreCatalog(path) as catalog: ...``."""

    def __init__(self, store_dir: Path) -> None:
        self.store_dir = store_dir
        layout.ensure_dirs(store_dir)
        self.conn = connect(store_dir)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def list_models(self, *, include_importing: bool = False) -> list[ModelRecord]:
        return list_models(self.store_dir, include_importing=include_importing, conn=self.conn)

    def find_model(self, ref: str) -> ModelRecord:
        return find_model(self.store_dir, ref, conn=self.conn)

    def find_chunk(self, digest: str) -> list[LocalChunk]:
        """Every place a verified, durable copy of a chunk lives (staged or published)."""
        rows = self.conn.execute(
            """SELECT c.byte_offset, c.length, f.id, f.path, f.state, m.name, m.version
               FROM chunks c JOIN files f ON f.id = c.file JOIN models m ON m.id = f.model
               WHERE c.digest = ? AND c.done = 1 AND f.state IN ('staging', 'published')""",
            (digest,),
        ).fetchall()
        found = []
        for r in rows:
            if r["state"] == "published":
                path = layout.published_path(self.store_dir, r["name"], r["version"], r["path"])
            else:
                path = layout.staged_path(self.store_dir, r["id"])
            found.append(LocalChunk(digest, path, r["byte_offset"], r["length"]))
        return found

    def read_local_chunk(self, digest: str) -> bytes | None:
        """The chunk's bytes from a local copy, re-checked against its hash; None if none is good.

        A staged file may be renamed into place between the lookup and the read, so a missing
        file triggers one more lookup.
        """
        for _attempt in range(2):
            missing = False
            for loc in self.find_chunk(digest):
                try:
                    data = read_local_copy(loc)
                except FileNotFoundError:
                    missing = True
                    continue
                if data is not None:
                    return data
            if not missing:
                break
        return None

    def data_version(self) -> int:
        """SQLite's ``PRAGMA data_version`` on this connection: another value than at the last
        call when some other connection has committed to the index meanwhile (a reader that
        polls, such as a partial seed, asks this instead of re-reading what it showed)."""
        return int(self.conn.execute("PRAGMA data_version").fetchall()[0][0])

    def held_digests(self) -> set[str]:
        """Digests of every chunk this host holds verified (peers advertise these)."""
        rows = self.conn.execute(
            """SELECT DISTINCT c.digest FROM chunks c JOIN files f ON f.id = c.file
               WHERE c.done = 1 AND f.state IN ('staging', 'published')"""
        )
        return {r["digest"] for r in rows}

    def manifest(self, manifest_hash: str) -> tuple[bytes, tuple[str, ...]] | None:
        """A recorded manifest's exact bytes and its detached signatures."""
        row = self.conn.execute(
            "SELECT body, signatures FROM manifests WHERE hash = ?", (manifest_hash,)
        ).fetchone()
        if row is None:
            return None
        return bytes(row["body"]), tuple(json.loads(row["signatures"]))

    def offered_manifests(self) -> list[tuple[str, str, int, bool]]:
        """(hash, channel, sequence, complete) of manifests a model in the store still refers
        to, or whose import is under way, newest sequence first (what a peer offers)."""
        rows = self.conn.execute(
            """SELECT mf.hash, mf.channel, mf.sequence,
                      COALESCE((SELECT i.state FROM imports i WHERE i.manifest = mf.hash), '')
                        AS import_state,
                      (SELECT COUNT(*) FROM models m WHERE m.manifest = mf.hash
                         AND m.state != 'published') AS unpublished
               FROM manifests mf
               WHERE mf.hash IN (SELECT manifest FROM models)
                  OR mf.hash IN (SELECT manifest FROM imports WHERE state = 'partial')
               ORDER BY mf.sequence DESC, mf.hash"""
        ).fetchall()
        return [
            (r["hash"], r["channel"], int(r["sequence"]),
             r["import_state"] != "partial" and int(r["unpublished"]) == 0)
            for r in rows
        ]

    def pending_imports(self) -> list[str]:
        """Hashes of manifests whose import has not completed."""
        rows = self.conn.execute(
            "SELECT manifest FROM imports WHERE state = 'partial' ORDER BY started_at"
        )
        return [r["manifest"] for r in rows]

    def chunks_of(self, file_id: int) -> list[StoredChunk]:
        return [
            StoredChunk(r["idx"], r["byte_offset"], r["length"], r["digest"])
            for r in self.conn.execute(
                "SELECT idx, byte_offset, length, digest FROM chunks WHERE file = ? ORDER BY idx",
                (file_id,),
            )
        ]

    def held_files(self, name: str, version: str
                   ) -> list[tuple[int, str, int, bool, list[tuple[int, int]]]]:
        """(file id, manifest path, size, published, (offset, length) of the chunks marked
        done by offset) of a model's staged or published files (a torrent's view of them)."""
        rows = self.conn.execute(
            """SELECT f.id, f.path, f.size, f.state FROM files f JOIN models m ON m.id = f.model
               WHERE m.name = ? AND m.version = ? AND f.state IN ('staging', 'published')""",
            (name, version),
        ).fetchall()
        out = []
        for row in rows:
            published = row["state"] == "published"
            done = [] if published else [(c["byte_offset"], c["length"]) for c in
                                         self.conn.execute(
                "SELECT byte_offset, length FROM chunks WHERE file = ? AND done = 1 "
                "ORDER BY byte_offset", (row["id"],))]
            out.append((int(row["id"]), row["path"], int(row["size"]), published, done))
        return out
