"""Read side of the store: what is in it, as frozen records (list, show, get for serving).

Only published models (and quarantined ones, shown as not verified) are ever listed; a model
still being imported is invisible here, so nothing half-written can be shown or served.
``get_model`` is what the server calls: it returns a model only when every file of it is
published, verified, and present with its recorded size; ``file_chunks`` gives the signed
chunk list the server re-hashes before a load.
"""

from __future__ import annotations

import difflib
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import ModelNotFoundError, StoreError, UsageError
from appliance.store import layout
from appliance.store.db import connect
from appliance.store.staging import StoredChunk


@dataclass(frozen=True)
class FileRecord:
    path: str  # relative path inside the model, as in the manifest
    size: int
    merkle_root: str
    blake3: str | None  # BLAKE3 of the whole file, set at publish
    state: str  # staging | published | quarantined
    verified_at: str | None
    location: Path  # where the published file lives (absent once quarantined)
    quarantine_path: Path | None

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "size": self.size,
            "merkle_root": self.merkle_root,
            "blake3": self.blake3,
            "state": self.state,
            "verified_at": self.verified_at,
            "location": str(self.location),
            "quarantine_path": str(self.quarantine_path) if self.quarantine_path else None,
        }


@dataclass(frozen=True)
class ModelRecord:
    name: str
    version: str
    license: str
    provenance: dict[str, Any]
    gguf: dict[str, Any]
    channel: str
    sequence: int
    manifest_hash: str
    signers: tuple[str, ...]
    state: str  # importing | published | quarantined
    started_at: str
    imported_at: str | None
    files: tuple[FileRecord, ...]
    dir: Path

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def verified(self) -> bool:
        return self.state == "published" and all(f.state == "published" for f in self.files)

    @property
    def verified_at(self) -> str | None:
        """When the least recently verified file was last verified (publish or store verify)."""
        times = [f.verified_at for f in self.files]
        if not times or any(t is None for t in times):
            return None
        return min(t for t in times if t is not None)

    @property
    def path(self) -> Path:
        """The model's main file: its first GGUF file, else its first file."""
        for f in self.files:
            if f.path.lower().endswith(".gguf"):
                return f.location
        if not self.files:
            raise StoreError(f"model {self.ref} has no files")
        return self.files[0].location

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(f.location for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "size": self.size,
            "verified": self.verified,
            "state": self.state,
            "license": self.license,
            "channel": self.channel,
            "sequence": self.sequence,
            "manifest_hash": self.manifest_hash,
            "signers": list(self.signers),
            "provenance": self.provenance,
            "gguf": self.gguf,
            "started_at": self.started_at,
            "imported_at": self.imported_at,
            "verified_at": self.verified_at,
            "files": [f.to_json() for f in self.files],
        }


_LISTED = 10  # models named in a not-found message; more are counted

_MODEL_QUERY = """
SELECT m.*, mf.channel, mf.sequence, mf.signers
FROM models m JOIN manifests mf ON mf.hash = m.manifest
"""


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``name`` or ``name:version``."""
    name, sep, version = ref.partition(":")
    if not name or (sep and not version):
        raise UsageError(f"model reference {ref!r} must be NAME or NAME:VERSION")
    return name, (version if sep else None)


def _record(store_dir: Path, conn: sqlite3.Connection, row: sqlite3.Row) -> ModelRecord:
    files = []
    for f in conn.execute("SELECT * FROM files WHERE model = ? ORDER BY id", (row["id"],)):
        files.append(
            FileRecord(
                path=f["path"],
                size=f["size"],
                merkle_root=f["merkle_root"],
                blake3=f["blake3"],
                state=f["state"],
                verified_at=f["verified_at"],
                location=layout.published_path(store_dir, row["name"], row["version"], f["path"]),
                quarantine_path=Path(f["quarantine_path"]) if f["quarantine_path"] else None,
            )
        )
    return ModelRecord(
        name=row["name"],
        version=row["version"],
        license=row["license"],
        provenance=json.loads(row["provenance"]),
        gguf=json.loads(row["gguf"]),
        channel=row["channel"],
        sequence=row["sequence"],
        manifest_hash=row["manifest"],
        signers=tuple(json.loads(row["signers"])),
        state=row["state"],
        started_at=row["started_at"],
        imported_at=row["imported_at"],
        files=tuple(files),
        dir=layout.model_dir(store_dir, row["name"], row["version"]),
    )


def list_models(
    store_dir: Path, *, include_importing: bool = False, conn: sqlite3.Connection | None = None
) -> list[ModelRecord]:
    """Published and quarantined models (and, if asked, those still importing), by name."""
    db = conn or connect(store_dir)
    try:
        states = (
            ("published", "quarantined", "importing")
            if include_importing
            else (
                "published",
                "quarantined",
            )
        )
        marks = ",".join("?" * len(states))
        rows = db.execute(
            f"{_MODEL_QUERY} WHERE m.state IN ({marks}) ORDER BY m.name, m.version", states
        ).fetchall()
        return [_record(store_dir, db, row) for row in rows]
    finally:
        if conn is None:
            db.close()


def find_model(
    store_dir: Path,
    ref: str,
    *,
    conn: sqlite3.Connection | None = None,
    include_importing: bool = False,
) -> ModelRecord:
    """Resolve ``name`` or ``name:version``; a bare name must match exactly one version."""
    name, version = parse_ref(ref)
    held = list_models(store_dir, include_importing=include_importing, conn=conn)
    models = [m for m in held if m.name == name and (version is None or m.version == version)]
    if not models:
        raise ModelNotFoundError(_not_found(store_dir, ref, held))
    if len(models) > 1:
        versions = ", ".join(f"{m.name}:{m.version}" for m in models)
        raise UsageError(f"{name!r} has several versions in the store ({versions}); name one")
    return models[0]


def _not_found(store_dir: Path, ref: str, held: list[ModelRecord]) -> str:
    """The message for a model that is not there: what is, and the closest name."""
    if not held:
        return f"no model {ref!r}: the store {store_dir} holds no models yet"
    refs = [m.ref for m in held]
    names = list(dict.fromkeys(m.name for m in held))
    close = difflib.get_close_matches(ref, refs + names, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    shown = ", ".join(refs[:_LISTED]) + (f" and {len(refs) - _LISTED} more"
                                          if len(refs) > _LISTED else "")
    return (f"no model {ref!r} in the store {store_dir}; {hint}it holds {shown} "
            "('appliance models list' shows them all)")


def get_model(store_dir: Path, ref: str) -> ModelRecord:
    """The model to serve: published, verified, and its files present at their recorded size.

    Raises ModelNotFoundError when there is no such model, StoreError when it exists but must
    not be loaded (quarantined by ``store verify``, or a file missing or resized since).
    """
    model = find_model(store_dir, ref)
    if not model.verified:
        raise StoreError(
            f"model {model.ref} failed verification and was quarantined; import it again"
        )
    for f in model.files:
        try:
            size = f.location.stat().st_size
        except OSError as e:
            raise StoreError(f"model {model.ref}: file {f.path} is unreadable: {e}") from e
        if size != f.size:
            raise StoreError(
                f"model {model.ref}: file {f.path} is {size} bytes, expected {f.size}; "
                "run 'appliance store verify'"
            )
    return model


def file_chunks(store_dir: Path, model: ModelRecord, path: str) -> list[StoredChunk]:
    """The signed chunk list of one file of ``model``, by offset order (what the server
    re-hashes before loading); StoreError when the file is no longer in the index."""
    db = connect(store_dir)
    try:
        row = db.execute(
            "SELECT f.id FROM files f JOIN models m ON m.id = f.model "
            "WHERE m.name = ? AND m.version = ? AND f.path = ?",
            (model.name, model.version, path),
        ).fetchone()
        if row is None:
            raise StoreError(f"model {model.ref}: file {path} vanished from the index")
        return [
            StoredChunk(r["idx"], r["byte_offset"], r["length"], r["digest"])
            for r in db.execute(
                "SELECT idx, byte_offset, length, digest FROM chunks WHERE file = ? ORDER BY idx",
                (row["id"],),
            )
        ]
    except sqlite3.Error as e:
        raise StoreError(f"cannot read the chunk list of {model.ref}/{path}: {e}") from e
    finally:
        db.close()
