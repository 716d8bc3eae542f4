"""The write side of the store: import bookkeeping, staged files, quarantine, removal.

``Store`` is a ``catalog.StoreCatalog`` (the read queries: where verified chunks live, held
digests, manifests offered, imports under way) plus the writes: transactions, audit records,
import plans, model and file rows, staging, quarantine moves and ``models rm``. Writers
(importer, peer pull, ``models rm``) hold ``layout.writer_lock`` around their work; readers
(the server, a peer serving chunks) just open a ``Store`` and read. The model inputs are
duck-typed (``ModelLike``...) so the manifest dataclasses of ``appliance.format.manifest`` are
passed straight in.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.errors import IntegrityError, StoreError
from appliance.format.fields import format_timestamp
from appliance.store import audit, layout
from appliance.store.catalog import StoreCatalog
from appliance.store.records import ModelRecord
from appliance.store.specs import (
    BundleOrigin,
    ChunkLike,
    FileLike,
    LocalChunk,
    ModelLike,
    ModelPlan,
    jsonable,
    prune_empty_dirs,
    read_local_copy,
    remove_tree,
)
from appliance.store.staging import (
    DEFAULT_FLUSH_BYTES,
    DEFAULT_FLUSH_CHUNKS,
    StagedFile,
    verify_chunks,
)

# Re-exported: callers import these from appliance.store.store.
__all__ = [
    "BundleOrigin",
    "ChunkLike",
    "FileLike",
    "LocalChunk",
    "ModelLike",
    "ModelPlan",
    "Store",
    "jsonable",
    "prune_empty_dirs",
    "read_local_copy",
    "remove_tree",
]


def _stamp(now: datetime | None) -> str:
    return format_timestamp(now or datetime.now(UTC))


def _file_key(files: Sequence[FileLike]) -> set[tuple[str, int, str]]:
    return {(f.path, f.size, f.merkle_root) for f in files}


class Store(StoreCatalog):
    """One open store: ``with Store(path) as store: ...``."""

    def __init__(self, store_dir: Path, *, flush_bytes: int = DEFAULT_FLUSH_BYTES,
                 flush_chunks: int = DEFAULT_FLUSH_CHUNKS) -> None:
        self.flush_bytes = flush_bytes
        self.flush_chunks = flush_chunks
        super().__init__(store_dir)
        self._head_stale = False

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error; sqlite errors become StoreError."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise layout.os_error(e, "cannot write the store index") from e
        try:
            yield self.conn
            self.conn.execute("COMMIT")
            if self._head_stale:
                self._head_stale = False
                audit.sync_head(self.store_dir, self.conn)
        except sqlite3.Error as e:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise layout.os_error(e, "cannot write the store index") from e
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise

    def audit(self, kind: str, details: dict[str, Any], now: datetime | None = None) -> None:
        """Append an audit record inside the current ``transaction()``."""
        if not self.conn.in_transaction:
            raise StoreError("audit records are appended inside a store transaction")
        audit.append(self.store_dir, kind, details, conn=self.conn, now=now)
        self._head_stale = True

    # -- importing -------------------------------------------------------------------------

    def plan(self, models: Sequence[ModelLike]) -> list[ModelPlan]:
        """What an import of these models would do; StoreError if one conflicts.

        A model already published (or quarantined) under the same name and version with
        different files is a conflict: the operator removes it first. Nothing is written.
        """
        plans = []
        for model in models:
            size = sum(f.size for f in model.files)
            row = self._model_row(model)
            if row is None:
                plans.append(ModelPlan(model.name, model.version, "new", size, 0, size))
                continue
            same = _file_key(model.files) == self._stored_file_key(row["id"])
            if not same and row["state"] != "importing":
                raise StoreError(
                    f"model {model.name}:{model.version} is already in the store with different "
                    f"files; remove it first ('appliance models rm {model.name}:{model.version}')"
                )
            if not same:
                plans.append(ModelPlan(model.name, model.version, "new", size, 0, size))
            elif row["state"] == "published":
                plans.append(ModelPlan(model.name, model.version, "present", size, size, 0))
            else:
                done, to_allocate = self._progress(row["id"])
                plans.append(
                    ModelPlan(model.name, model.version, "resume", size, done, to_allocate)
                )
        return plans

    def _model_row(self, model: ModelLike) -> sqlite3.Row | None:
        return self.conn.execute(
            "SELECT id, state FROM models WHERE name = ? AND version = ?",
            (model.name, model.version),
        ).fetchone()

    def all_published(self, models: Sequence[ModelLike]) -> bool:
        """Whether every one of these models is published in the store."""
        rows = (self._model_row(m) for m in models)
        return all(r is not None and r["state"] == "published" for r in rows)

    def _stored_file_key(self, model_id: int) -> set[tuple[str, int, str]]:
        rows = self.conn.execute(
            "SELECT path, size, merkle_root FROM files WHERE model = ?", (model_id,)
        )
        return {(r["path"], r["size"], r["merkle_root"]) for r in rows}

    def _progress(self, model_id: int) -> tuple[int, int]:
        done = 0
        to_allocate = 0
        for f in self.conn.execute(
            "SELECT id, size, state FROM files WHERE model = ?", (model_id,)
        ).fetchall():
            if f["state"] == "published":
                done += f["size"]
                continue
            if f["state"] == "staging" and layout.staged_path(self.store_dir, f["id"]).exists():
                done += self.conn.execute(
                    "SELECT COALESCE(SUM(length), 0) AS n FROM chunks WHERE file = ? AND done = 1",
                    (f["id"],),
                ).fetchone()["n"]
            else:
                to_allocate += f["size"]
        return done, to_allocate

    def add_manifest(self, origin: BundleOrigin, total_bytes: int, now: datetime | None) -> None:
        """Record the manifest and its import; call inside ``transaction()``."""
        stamp = _stamp(now)
        self.conn.execute(
            """INSERT OR IGNORE INTO manifests
               (hash, channel, sequence, body, signatures, signers, added_at)
               VALUES (?, ?, ?, ?, ?, ?, ?)""",
            (
                origin.manifest_hash,
                origin.channel,
                origin.sequence,
                origin.manifest_bytes,
                json.dumps(list(origin.signatures)),
                json.dumps(list(origin.signers)),
                stamp,
            ),
        )
        self.conn.execute(
            """INSERT INTO imports (manifest, state, started_at, updated_at, total_bytes)
               VALUES (?, 'partial', ?, ?, ?)
               ON CONFLICT (manifest) DO UPDATE SET updated_at = excluded.updated_at""",
            (origin.manifest_hash, stamp, stamp, total_bytes),
        )

    def finish_import(self, manifest_hash: str, now: datetime | None) -> None:
        """Mark the import complete; one already complete (a pull or import again that found
        everything present: ``add_manifest`` has just stamped it) costs no commit."""
        row = self.conn.execute("SELECT state FROM imports WHERE manifest = ?",
                                (manifest_hash,)).fetchone()
        if row is not None and row["state"] == "complete":
            return
        with self.transaction():
            self.conn.execute(
                "UPDATE imports SET state = 'complete', updated_at = ? WHERE manifest = ?",
                (_stamp(now), manifest_hash),
            )

    def begin_model(
        self, model: ModelLike, manifest_hash: str, now: datetime | None = None
    ) -> int | None:
        """Make (or find) the model's rows; None when it is already published identically."""
        self.recover()
        row = self._model_row(model)
        stale_files: list[int] = []
        if row is not None:
            same = _file_key(model.files) == self._stored_file_key(row["id"])
            if same and row["state"] == "published":
                return None
            if same:
                with self.transaction():
                    # A quarantined file (or a lost staged file) starts again from nothing.
                    self.conn.execute(
                        """UPDATE chunks SET done = 0 WHERE file IN
                           (SELECT id FROM files WHERE model = ? AND state = 'quarantined')""",
                        (row["id"],),
                    )
                    self.conn.execute(
                        """UPDATE files SET state = 'staging', quarantine_path = NULL
                           WHERE model = ? AND state = 'quarantined'""",
                        (row["id"],),
                    )
                    self.conn.execute(
                        "UPDATE models SET state = 'importing', manifest = ? WHERE id = ?",
                        (manifest_hash, row["id"]),
                    )
                return int(row["id"])
            if row["state"] != "importing":
                self.plan([model])  # raises the conflict
            stale_files = [
                r["id"]
                for r in self.conn.execute("SELECT id FROM files WHERE model = ?", (row["id"],))
            ]
        # Leftovers of an interrupted rm or an abandoned import at the final paths are orphans.
        for f in model.files:
            final = layout.published_path(self.store_dir, model.name, model.version, f.path)
            if final.exists():
                final.unlink()
        stamp = _stamp(now)
        with self.transaction():
            if row is not None:
                self.conn.execute("DELETE FROM models WHERE id = ?", (row["id"],))
            cur = self.conn.execute(
                """INSERT INTO models (name, version, license, provenance, gguf, manifest, state,
                   started_at) VALUES (?, ?, ?, ?, ?, ?, 'importing', ?)""",
                (
                    model.name,
                    model.version,
                    model.license,
                    json.dumps(jsonable(model.provenance), sort_keys=True),
                    json.dumps(jsonable(model.gguf), sort_keys=True),
                    manifest_hash,
                    stamp,
                ),
            )
            model_id = int(cur.lastrowid or 0)
            for f in model.files:
                layout.relative_parts(f.path)
                fcur = self.conn.execute(
                    """INSERT INTO files (model, path, size, merkle_root, state)
                       VALUES (?, ?, ?, ?, 'staging')""",
                    (model_id, f.path, f.size, f.merkle_root),
                )
                file_id = int(fcur.lastrowid or 0)
                self.conn.executemany(
                    """INSERT INTO chunks (file, idx, byte_offset, length, digest)
                       VALUES (?, ?, ?, ?, ?)""",
                    ((file_id, i, c.offset, c.length, c.digest) for i, c in enumerate(f.chunks)),
                )
        for file_id in stale_files:
            layout.staged_path(self.store_dir, file_id).unlink(missing_ok=True)
        return model_id

    def stage_files(self, model_id: int, now: datetime | None = None) -> list[StagedFile]:
        """The model's files, ready to receive chunks (finishing any publish a crash cut)."""
        model = self.conn.execute(
            "SELECT name, version FROM models WHERE id = ?", (model_id,)
        ).fetchone()
        staged = []
        for row in self.conn.execute(
            "SELECT id, path, size, state FROM files WHERE model = ? ORDER BY id", (model_id,)
        ).fetchall():
            sf = StagedFile(
                conn=self.conn,
                store_dir=self.store_dir,
                file_id=row["id"],
                model_id=model_id,
                model_name=model["name"],
                model_version=model["version"],
                path=row["path"],
                size=row["size"],
                state=row["state"],
                flush_bytes=self.flush_bytes,
                flush_chunks=self.flush_chunks,
            )
            if sf.state == "staging" and not sf.staged.exists():
                self._settle_lost_staged(sf, now)
            staged.append(sf)
        return staged

    def mark_staged_chunks(self, chunks: Sequence[tuple[int, int]], *, done: bool) -> None:
        """Mark staged chunks (file id, idx) done or not done, in one transaction: a torrent
        fetch un-marks done chunks before libtorrent may overwrite them with unverified bytes,
        and marks them again once their checked copies are written back and fsynced."""
        with self.transaction():
            self.conn.executemany(
                """UPDATE chunks SET done = ? WHERE file = ? AND idx = ?
                   AND file IN (SELECT id FROM files WHERE state = 'staging')""",
                [(int(done), file_id, idx) for file_id, idx in chunks],
            )

    def _settle_lost_staged(self, sf: StagedFile, now: datetime | None) -> None:
        """A staging row without its staged file: a publish cut before its commit, or new."""
        if sf.final.exists():
            try:
                whole = verify_chunks(sf.final, sf.all_chunks(), sf.size, sf.label)
            except (IntegrityError, OSError) as e:
                # Not what the manifest says: keep it as evidence, start the file again.
                target = self.quarantine_target(
                    sf.file_id, sf.model_name, sf.model_version, sf.path, now
                )
                try:
                    os.rename(sf.final, target)
                    layout.fsync_dir(target.parent)
                except OSError as move_error:
                    raise layout.os_error(move_error, f"cannot quarantine {sf.final}") from e
                with self.transaction():
                    self.audit(
                        "quarantine",
                        {
                            "model": sf.model_name,
                            "version": sf.model_version,
                            "path": sf.path,
                            "reason": str(e),
                            "moved_to": str(target),
                        },
                        now,
                    )
            else:
                sf.mark_published(whole, now)
                return
        # A new file has no chunk done yet: no transaction (one commit, one WAL sync, saved
        # on every file of every import). A lost staged file's marks are cleared durably.
        if self.conn.execute("SELECT 1 FROM chunks WHERE file = ? AND done = 1 LIMIT 1",
                             (sf.file_id,)).fetchone() is not None:
            with self.transaction():
                self.conn.execute("UPDATE chunks SET done = 0 WHERE file = ?", (sf.file_id,))

    def recover(self) -> None:
        """Finish quarantine moves that a crash interrupted (the index already says quarantined)."""
        for row in self.conn.execute(
            """SELECT f.path, f.quarantine_path, m.name, m.version FROM files f
               JOIN models m ON m.id = f.model
               WHERE f.state = 'quarantined' AND f.quarantine_path IS NOT NULL"""
        ).fetchall():
            final = layout.published_path(self.store_dir, row["name"], row["version"], row["path"])
            target = Path(row["quarantine_path"])
            if final.exists() and not target.exists():
                try:
                    os.rename(final, target)
                    layout.fsync_dir(target.parent)
                except OSError as e:
                    raise layout.os_error(e, f"cannot move {final} to quarantine") from e

    def quarantine_target(
        self, file_id: int, name: str, version: str, path: str, now: datetime | None
    ) -> Path:
        stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
        base = layout.quarantine_dir(self.store_dir) / layout.quarantine_name(
            stamp, file_id, name, version, path
        )
        target, n = base, 1
        while target.exists():
            n += 1
            target = base.with_name(f"{base.name}.{n}")
        return target

    # -- removing --------------------------------------------------------------------------

    def remove_model(self, ref: str, now: datetime | None = None, *,
                     user: str | None = None) -> ModelRecord:
        """Forget a model, then delete its files (quarantined copies are kept). ``user``:
        who asked, recorded in the audit record."""
        model = self.find_model(ref)
        with self.transaction():
            row = self.conn.execute(
                "SELECT id FROM models WHERE name = ? AND version = ?", (model.name, model.version)
            ).fetchone()
            file_ids = [
                r["id"]
                for r in self.conn.execute("SELECT id FROM files WHERE model = ?", (row["id"],))
            ]
            self.conn.execute("DELETE FROM models WHERE id = ?", (row["id"],))
            self.audit(
                "delete",
                {
                    "model": model.name,
                    "version": model.version,
                    "size": model.size,
                    "manifest": model.manifest_hash,
                    **({"user": user} if user is not None else {}),
                },
                now,
            )
        # The index no longer names these files; a crash from here on leaves orphans for gc.
        for file_id in file_ids:
            layout.staged_path(self.store_dir, file_id).unlink(missing_ok=True)
        remove_tree(model.dir)
        prune_empty_dirs(layout.models_dir(self.store_dir))
        return model
