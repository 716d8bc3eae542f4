"""Store upkeep: ``verify_store`` (re-hash, quarantine), ``quarantine_damaged`` (one chunk
found bad while serving it) and ``gc`` (leftovers, orphans, the scratch directories of
torrent commands no running process holds: ``appliance.torrent.scratch``).

A file that no longer matches its signed chunk list is never deleted: the index is updated
first (file and model ``quarantined``, its chunks no longer offered to peers, an audit
"quarantine" record), then the file is moved to ``quarantine/``. A crash between the two is
finished by ``Store.recover``. A quarantined model is listed as not verified and is never
served; importing the same bundle again re-fetches it.

``quarantine_damaged`` is the same rule for a seed that re-checks a chunk before sending it and
finds its own copy damaged: every published file whose copy of that chunk is bad is
quarantined as ``store verify`` would, a bad staged copy is marked not done (fetched again),
and both stop being advertised at once. It does not take the writer lock (a serving host may
be pulling at the same time): each change is one IMMEDIATE transaction on rows it re-reads.
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from appliance.chunks import check_chunk
from appliance.errors import IntegrityError
from appliance.format.fields import format_timestamp
from appliance.store import layout
from appliance.store.staging import verify_chunks
from appliance.store.store import Store, prune_empty_dirs, remove_tree
from appliance.torrent import scratch

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class CorruptFile:
    model: str
    version: str
    path: str
    reason: str
    chunk: str | None
    offset: int | None
    quarantined_to: Path | None  # None when the file had vanished


@dataclass(frozen=True)
class VerifyReport:
    files_checked: int
    bytes_checked: int
    corrupt: tuple[CorruptFile, ...]

    @property
    def ok(self) -> bool:
        return not self.corrupt


@dataclass
class GcReport:
    removed: list[Path] = field(default_factory=list)
    freed_bytes: int = 0
    abandoned: list[str] = field(default_factory=list)  # name:version of dropped imports
    pending: list[str] = field(default_factory=list)  # name:version of imports kept to resume


def verify_store(
    store_dir: Path, *, progress: Progress | None = None, now: datetime | None = None
) -> VerifyReport:
    """Re-hash every published file against its chunk list; quarantine those that differ.

    On a read-only store it only reports: nothing is recovered, recorded or quarantined."""
    read_only = layout.read_only_reason(store_dir) is not None
    with (
        layout.writer_lock(store_dir, "store verify", read_only_ok=True),
        Store(store_dir) as store,
    ):
        if not read_only:
            store.recover()
        rows = store.conn.execute(
            """SELECT f.id, f.path, f.size, f.blake3, m.id AS model_id, m.name, m.version
               FROM files f JOIN models m ON m.id = f.model
               WHERE f.state = 'published' ORDER BY m.name, m.version, f.path"""
        ).fetchall()
        total = sum(r["size"] for r in rows)
        done = 0
        corrupt = []
        for r in rows:
            final = layout.published_path(store_dir, r["name"], r["version"], r["path"])
            label = f"{r['name']}:{r['version']}/{r['path']}"
            try:
                whole = verify_chunks(final, store.chunks_of(r["id"]), r["size"], label,
                                      expected=r["blake3"] or None)
                if r["blake3"] and whole != r["blake3"]:
                    raise IntegrityError(
                        "whole-file hash differs from the one recorded", file=label
                    )
            except IntegrityError as e:
                corrupt.append(_quarantine(store, r, final, str(e), e.chunk, e.offset, now))
            except FileNotFoundError:
                corrupt.append(_quarantine(store, r, final, "file is missing", None, None, now))
            except OSError as e:
                corrupt.append(_quarantine(store, r, final, f"unreadable: {e}", None, None, now))
            else:
                if not read_only:
                    with store.transaction():
                        store.conn.execute(
                            "UPDATE files SET verified_at = ? WHERE id = ?",
                            (format_timestamp(now or datetime.now(UTC)), r["id"]),
                        )
            done += r["size"]
            if progress:
                progress(done, total)
        return VerifyReport(len(rows), done, tuple(corrupt))


def _quarantine(
    store: Store,
    row: sqlite3.Row,
    final: Path,
    reason: str,
    chunk: str | None,
    offset: int | None,
    now: datetime | None,
) -> CorruptFile:
    file_id, name, version, path = row["id"], row["name"], row["version"], row["path"]
    if layout.read_only_reason(store.store_dir) is not None:  # report only: cannot move it
        return CorruptFile(name, version, path, reason, chunk, offset, None)
    target = store.quarantine_target(file_id, name, version, path, now) if final.exists() else None
    with store.transaction():
        store.conn.execute(
            "UPDATE files SET state = 'quarantined', quarantine_path = ? WHERE id = ?",
            (str(target) if target else None, file_id),
        )
        store.conn.execute("UPDATE chunks SET done = 0 WHERE file = ?", (file_id,))
        store.conn.execute(
            "UPDATE models SET state = 'quarantined' WHERE id = ?",
            (row["model_id"],),
        )
        store.audit(
            "quarantine",
            {
                "model": name,
                "version": version,
                "path": path,
                "reason": reason,
                "chunk": chunk,
                "offset": offset,
                "moved_to": str(target) if target else None,
            },
            now,
        )
    if target is not None:
        store.recover()  # the index says quarantined: move the file (again after a crash)
    return CorruptFile(name, version, path, reason, chunk, offset, target)


def quarantine_damaged(
    store_dir: Path, digest: str, *, now: datetime | None = None
) -> list[CorruptFile]:
    """Re-check every durable local copy of chunk ``digest``; quarantine what is damaged.

    Returns the files quarantined or reset (empty when every copy is good): published ones
    are quarantined (index first, audited, then moved), a staged one has the chunk marked not
    done again (audited too), so ``held_digests`` no longer lists it either way.
    """
    found: list[CorruptFile] = []
    with Store(store_dir) as store:
        store.recover()
        rows = store.conn.execute(
            """SELECT f.id, f.path, f.state, c.idx, c.byte_offset, c.length,
                      m.id AS model_id, m.name, m.version
               FROM chunks c JOIN files f ON f.id = c.file JOIN models m ON m.id = f.model
               WHERE c.digest = ? AND c.done = 1 AND f.state IN ('staging', 'published')""",
            (digest,),
        ).fetchall()
        for r in rows:
            published = r["state"] == "published"
            path = (layout.published_path(store_dir, r["name"], r["version"], r["path"])
                    if published else layout.staged_path(store_dir, r["id"]))
            label = f"{r['name']}:{r['version']}/{r['path']}"
            reason = _damage(path, digest, r["length"], r["byte_offset"], label)
            if reason is None:
                continue
            if published:
                found.append(_quarantine(store, r, path, reason, digest, r["byte_offset"], now))
                continue
            with store.transaction():
                store.conn.execute(
                    "UPDATE chunks SET done = 0 WHERE file = ? AND idx = ?", (r["id"], r["idx"])
                )
                store.audit("quarantine", {
                    "model": r["name"], "version": r["version"], "path": r["path"],
                    "reason": reason, "chunk": digest, "offset": r["byte_offset"],
                    "moved_to": None, "staged": True,
                }, now)
            found.append(CorruptFile(r["name"], r["version"], r["path"], reason, digest,
                                     r["byte_offset"], None))
    return found


def _damage(path: Path, digest: str, length: int, offset: int, label: str) -> str | None:
    """Why the copy at ``path`` is bad, or None when it holds the chunk's signed bytes."""
    try:
        with open(path, "rb", buffering=0) as f:
            data = os.pread(f.fileno(), length, offset)
        check_chunk(data, digest, length, file=label, offset=offset)
    except FileNotFoundError:
        return "file is missing"
    except IntegrityError as e:
        return str(e)
    except OSError as e:
        return f"unreadable: {e}"
    return None


_STAGED_NAME = re.compile(r"^(\d+)" + re.escape(layout.STAGED_SUFFIX) + r"$")


def gc(store_dir: Path, *, abandon: bool = False, now: datetime | None = None) -> GcReport:
    """Delete what no index row accounts for; with ``abandon``, drop unfinished imports too.

    Staged files of an import that can still resume are kept unless ``abandon``. Quarantined
    files are evidence and are never touched here.
    """
    report = GcReport()
    with layout.writer_lock(store_dir, "store gc"), Store(store_dir) as store:
        store.recover()
        importing = store.conn.execute(
            "SELECT id, name, version FROM models WHERE state = 'importing'"
        ).fetchall()
        for m in importing:
            ref = f"{m['name']}:{m['version']}"
            if abandon:
                with store.transaction():
                    store.conn.execute("DELETE FROM models WHERE id = ?", (m["id"],))
                    store.audit(
                        "delete",
                        {"model": m["name"], "version": m["version"], "abandoned_import": True},
                        now,
                    )
                report.abandoned.append(ref)
            else:
                store.stage_files(m["id"], now)  # finishes a publish a crash cut short
                report.pending.append(ref)
        if abandon:
            with store.transaction():
                store.conn.execute(
                    "UPDATE imports SET state = 'abandoned', updated_at = ? "
                    "WHERE state = 'partial'",
                    (format_timestamp(now or datetime.now(UTC)),),
                )
        staging_ids = {
            r["id"] for r in store.conn.execute("SELECT id FROM files WHERE state = 'staging'")
        }
        staging = layout.staging_dir(store_dir)
        for entry in sorted(staging.iterdir()):
            match = _STAGED_NAME.match(entry.name)
            if match and int(match.group(1)) in staging_ids:
                continue
            _remove(entry, report)
        published = {
            layout.published_path(store_dir, r["name"], r["version"], r["path"])
            for r in store.conn.execute(
                """SELECT f.path, m.name, m.version FROM files f JOIN models m ON m.id = f.model
                   WHERE f.state = 'published'"""
            )
        }
        models = layout.models_dir(store_dir)
        for dirpath, _dirs, files in os.walk(models):
            for name in files:
                path = Path(dirpath) / name
                if path not in published:
                    _remove(path, report)
        prune_empty_dirs(models)
        _sweep_torrent_scratch(store_dir, report, now)
    return report


def _sweep_torrent_scratch(store_dir: Path, report: GcReport, now: datetime | None) -> None:
    """What killed torrent commands left in STORE/torrent-scratch (held directories stay).

    A fetch un-marks the done chunks libtorrent may overwrite before it keeps their copies in
    guard/, so dropping a copy costs a re-fetch, never a done chunk with other bytes; each
    one's durable copies are still re-checked (a copy left by an older version)."""
    for swept in scratch.sweep(store_dir):
        report.removed.append(swept.path)
        report.freed_bytes += swept.freed_bytes
        for digest in swept.guarded:
            quarantine_damaged(store_dir, digest, now=now)


def _remove(path: Path, report: GcReport) -> None:
    try:
        size = path.lstat().st_size if not path.is_dir() else 0
        if path.is_dir() and not path.is_symlink():
            remove_tree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return
    except OSError as e:
        raise layout.os_error(e, f"cannot remove {path}") from e
    report.removed.append(path)
    report.freed_bytes += size
