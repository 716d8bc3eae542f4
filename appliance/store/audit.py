"""Append-only, hash-chained audit log in the store index.

Each record holds the hash of the record before it; ``hash = BLAKE3(domain || canonical JSON of
(seq, time, kind, details, prev))``. Editing, removing or reordering a record breaks the
chain, which ``verify`` reports as ``AuditChainError`` naming the first bad record.
Kinds used: import, refusal, override, trust-install, trust-update, delete, quarantine,
serve-start, pull.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import blake3

from appliance.errors import AuditChainError
from appliance.store.db import connect

_DOMAIN = b"appliance/audit/v1\x00"
GENESIS = "0" * 64


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
    own = conn is None
    db = conn if conn is not None else connect(store_dir)
    try:
        if own:
            db.execute("BEGIN IMMEDIATE")
        row = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        seq = (row["seq"] + 1) if row else 1
        prev = row["hash"] if row else GENESIS
        time = (now or datetime.now(UTC)).isoformat(timespec="seconds")
        details_json = json.dumps(details, sort_keys=True, separators=(",", ":"))
        digest = record_hash(seq, time, kind, details_json, prev)
        db.execute(
            "INSERT INTO audit (seq, time, kind, details, prev, hash) VALUES (?, ?, ?, ?, ?, ?)",
            (seq, time, kind, details_json, prev, digest),
        )
        if own:
            db.execute("COMMIT")
    except BaseException:
        if own and db.in_transaction:
            db.execute("ROLLBACK")
        raise
    finally:
        if own:
            db.close()
    return AuditRecord(seq, time, kind, details, prev, digest)


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
        return count
    finally:
        db.close()
