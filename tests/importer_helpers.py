"""Helpers for the importer tests: a store that trusts the test root, media hashing, checks."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import blake3
from bundle_helpers import NOW

from appliance.importer import import_media
from appliance.store.db import connect
from appliance.store.layout import published_path, staged_path


def tree_digest(path: Path) -> dict[str, tuple[str, float, int]]:
    """Every file (and directory) under ``path``: content hash, mtime and mode."""
    out: dict[str, tuple[str, float, int]] = {}
    for p in sorted(path.rglob("*")):
        st = p.stat()
        content = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[str(p.relative_to(path))] = (content, st.st_mtime, st.st_mode)
    return out


def check_consistent(store_dir: Path) -> dict[str, int]:
    """The index and the files agree: every chunk marked done is durable and correct at its
    offset; every published file exists at its place; no staged file lacks a staging row.
    Returns counts for the caller's curiosity."""
    db = connect(store_dir)
    counts = {
        "done_chunks": 0,
        "published_files": 0,
        "staging_files": 0,
        "renamed_not_committed": 0,
    }
    try:
        files = db.execute(
            "SELECT f.id, f.path, f.size, f.state, m.name, m.version, m.state AS mstate "
            "FROM files f JOIN models m ON m.id = f.model"
        ).fetchall()
        staging_ids = set()
        for f in files:
            if f["state"] == "published":
                path = published_path(store_dir, f["name"], f["version"], f["path"])
                assert path.stat().st_size == f["size"], f"published {path} has the wrong size"
                counts["published_files"] += 1
            elif f["state"] == "staging":
                staging_ids.add(f["id"])
                path = staged_path(store_dir, f["id"])
                assert f["mstate"] != "published", "a model is published with a staging file"
                counts["staging_files"] += 1
                if not path.exists():
                    # Killed between publish's rename and its commit: the file is complete at
                    # its final place, and the next run (or gc) finishes the publish.
                    final = published_path(store_dir, f["name"], f["version"], f["path"])
                    if final.exists():
                        path = final
                        counts["renamed_not_committed"] += 1
            else:
                continue
            done = db.execute(
                "SELECT byte_offset, length, digest FROM chunks WHERE file = ? AND done = 1",
                (f["id"],),
            ).fetchall()
            if not done:
                continue
            with open(path, "rb") as handle:
                for c in done:
                    data = os.pread(handle.fileno(), c["length"], c["byte_offset"])
                    assert blake3.blake3(data).hexdigest() == c["digest"], (
                        f"chunk at {c['byte_offset']} of {path} is marked done but differs"
                    )
                    counts["done_chunks"] += 1
        staging = store_dir / "staging"
        for entry in staging.iterdir() if staging.exists() else ():
            stem = entry.name.removesuffix(".part")
            assert stem.isdigit() and int(stem) in staging_ids, f"stray staged file {entry}"
        for model in db.execute("SELECT id, state FROM models WHERE state = 'published'"):
            left = db.execute(
                "SELECT COUNT(*) FROM files WHERE model = ? AND state != 'published'",
                (model["id"],),
            ).fetchone()[0]
            assert left == 0, "a published model has unpublished files"
    finally:
        db.close()
    return counts


def run_import_child(
    store: str, media: list[str], pause: float, flush_bytes: int, started: Any
) -> None:
    """Body of the importer child process the crash test kills (pauses after each chunk).

    ``started`` (a multiprocessing Event) is set once the child is running, so the parent
    times its kill from there rather than from process start-up."""
    started.set()
    import_media(
        Path(store),
        [Path(m) for m in media],
        now=NOW,
        progress=lambda done, total: time.sleep(pause),
        flush_bytes=flush_bytes,
    )
