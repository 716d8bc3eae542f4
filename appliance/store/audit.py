"""Append-only, hash-chained audit log in the store index.

Each record holds the hash of the record before it; ``hash = BLAKE3(domain || canonical JSON of
(seq, time, kind, details, prev))``. Editing, removing or reordering a record breaks the
chain, which ``verify`` reports as ``AuditChainError`` naming the first bad record.
Kinds used: import, refusal, override, trust-install, trust-update, delete, quarantine,
serve-start, pull, export.

A chain alone cannot show that its newest records were cut off, so the store also keeps
``audit-head`` (``"<seq> <hash>\n"`` of the newest record seen) outside the database. It is
refreshed after each committed append made here and by ``verify``; it may lag behind the log
(a crash after a commit, or an append inside a caller's transaction) but never run ahead of
it, so a head naming a record the log no longer holds means records were removed.

The head is also the log's anchor: a store that holds trust roots, manifests or models has
had records appended (each of those is audited), so a missing head or an empty log there
means the log was removed or replaced, and ``verify`` says so instead of anchoring anew.
Only a store that holds nothing yet may start a log from nothing.

Record times are RFC 3339 UTC with a ``Z`` (``appliance.format.fields.format_timestamp``).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import blake3

from appliance import fsutil
from appliance.errors import AuditChainError
from appliance.format.fields import format_timestamp
from appliance.store.db import connect

_DOMAIN = b"appliance/audit/v1\x00"
GENESIS = "0" * 64
HEAD_NAME = "audit-head"


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    time: str
    kind: str
    details: dict[str, Any]
    prev: str
    hash: str

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time": self.time,
            "kind": self.kind,
            "details": self.details,
            "prev": self.prev,
            "hash": self.hash,
        }


def record_hash(seq: int, time: str, kind: str, details_json: str, prev: str) -> str:
    body = json.dumps([seq, time, kind, details_json, prev], separators=(",", ":"))
    return blake3.blake3(_DOMAIN + body.encode("utf-8")).hexdigest()


def append(
    store_dir: Path,
    kind: str,
    details: dict[str, Any],
    *,
    conn: sqlite3.Connection | None = None,
    now: datetime | None = None,
) -> AuditRecord:
    """Append one record; runs in its own IMMEDIATE transaction unless ``conn`` is in one."""
    if conn is not None:
        return _insert(conn, kind, details, now)
    return append_many(store_dir, [(kind, details)], now=now)[0]


def append_many(store_dir: Path, entries: Sequence[tuple[str, dict[str, Any]]], *,
                now: datetime | None = None) -> list[AuditRecord]:
    """Append ``(kind, details)`` records in order, in one IMMEDIATE transaction: one commit
    and one head write for all of them (``audit_group.GroupedAudit`` gathers them)."""
    db = connect(store_dir)
    try:
        db.execute("BEGIN IMMEDIATE")
        appended = [_insert(db, kind, details, now) for kind, details in entries]
        db.execute("COMMIT")
        if appended:
            write_head(store_dir, appended[-1].seq, appended[-1].hash)
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    finally:
        db.close()
    return appended


def _insert(db: sqlite3.Connection, kind: str, details: dict[str, Any],
            now: datetime | None) -> AuditRecord:
    row = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    seq = (row["seq"] + 1) if row else 1
    prev = row["hash"] if row else GENESIS
    time = format_timestamp(now or datetime.now(UTC))
    details_json = json.dumps(details, sort_keys=True, separators=(",", ":"))
    digest = record_hash(seq, time, kind, details_json, prev)
    db.execute(
        "INSERT INTO audit (seq, time, kind, details, prev, hash) VALUES (?, ?, ?, ?, ?, ?)",
        (seq, time, kind, details_json, prev, digest),
    )
    return AuditRecord(seq, time, kind, details, prev, digest)


def read_head(store_dir: Path) -> tuple[int, str] | None:
    try:
        text = (store_dir / HEAD_NAME).read_text("ascii")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise AuditChainError(f"the audit head file is unreadable: {e}") from e
    parts = text.split()
    if len(parts) != 2 or not parts[0].isdigit():
        raise AuditChainError(f"the audit head file {store_dir / HEAD_NAME} is malformed")
    return int(parts[0]), parts[1]


def write_head(store_dir: Path, seq: int, digest: str) -> None:
    """Record the newest committed record; never moves the head backwards.

    A head that already names this record is left alone (a transaction that appended
    nothing costs no write). The new head's bytes are fsynced before the rename, so a crash
    never leaves a torn head; the directory is fsynced only when the head is created: losing
    the rename of a *replaced* head leaves the older head, which lags (allowed above), while
    losing a first head would read as a removed log."""
    current = None
    with contextlib.suppress(AuditChainError):
        current = read_head(store_dir)
    if current is not None and (current[0] > seq or current == (seq, digest)):
        return
    with contextlib.suppress(OSError):
        # The head is a tripwire, not the log: failing to move it must not fail the append.
        fsutil.write_atomic(store_dir / HEAD_NAME, f"{seq} {digest}\n".encode("ascii"),
                            sync_dir=current is None)


def sync_head(store_dir: Path, conn: sqlite3.Connection | None = None) -> None:
    """Move the head to the newest committed record (call after committing your transaction)."""
    db = conn if conn is not None else connect(store_dir)
    try:
        row = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    finally:
        if conn is None:
            db.close()
    if row is not None:
        write_head(store_dir, row["seq"], row["hash"])


def records(store_dir: Path) -> Iterator[AuditRecord]:
    db = connect(store_dir)
    try:
        for row in db.execute("SELECT * FROM audit ORDER BY seq"):
            yield AuditRecord(
                row["seq"], row["time"], row["kind"], json.loads(row["details"]),
                row["prev"], row["hash"],
            )
    finally:
        db.close()


def _holdings(db: sqlite3.Connection) -> str:
    """What the store holds that was audited when it arrived, e.g. '1 trust root(s)'."""
    held = []
    for table, what in (("trust_roots", "trust root"), ("manifests", "manifest"),
                        ("models", "model")):
        (n,) = db.execute(f"SELECT count(*) FROM {table}").fetchone()
        if n:
            held.append(f"{n} {what}(s)")
    return ", ".join(held)


def verify(store_dir: Path) -> int:
    """Check the whole chain; return the number of records, or raise AuditChainError."""
    db = connect(store_dir)
    try:
        prev = GENESIS
        expected_seq = 1
        count = 0
        for row in db.execute("SELECT * FROM audit ORDER BY seq"):
            seq = row["seq"]
            if seq != expected_seq:
                raise AuditChainError(f"audit record {expected_seq} is missing (next is {seq})")
            if row["prev"] != prev:
                raise AuditChainError(
                    f"audit record {seq} does not follow record {seq - 1} (removed or reordered)"
                )
            digest = record_hash(seq, row["time"], row["kind"], row["details"], row["prev"])
            if digest != row["hash"]:
                raise AuditChainError(f"audit record {seq} was edited (its hash does not match)")
            prev = row["hash"]
            expected_seq += 1
            count += 1
        head = read_head(store_dir)
        if head is None or count == 0:
            held = _holdings(db)
            if held and count == 0:
                raise AuditChainError(
                    f"the audit log is empty, but the store holds {held}: the log was removed "
                    "(not intact; it is not started anew)"
                )
            if held:
                raise AuditChainError(
                    f"the audit head file {store_dir / HEAD_NAME} is missing, but the store "
                    f"holds {held}: the log cannot be shown complete (not intact; it is not "
                    "re-anchored)"
                )
        if head is not None:
            head_seq, head_hash = head
            if head_seq > count:
                raise AuditChainError(
                    f"audit records {count + 1} to {head_seq} were removed "
                    f"(the log ends at {count}, its head file names record {head_seq})"
                )
            row = db.execute("SELECT hash FROM audit WHERE seq = ?", (head_seq,)).fetchone()
            if row is None or row["hash"] != head_hash:
                raise AuditChainError(
                    f"audit record {head_seq} differs from the one the head file recorded "
                    "(the log was rewritten)"
                )
        if count:
            write_head(store_dir, count, prev)
        return count
    finally:
        db.close()
