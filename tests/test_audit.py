"""The hash-chained audit log: every edit, removal or reordering is caught by ``verify``."""

from __future__ import annotations

import itertools
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
from trust_helpers import NOW as TRUST_NOW
from trust_helpers import make_root

from appliance import fsutil
from appliance.cli.main import main
from appliance.errors import EXIT_REFUSED, AuditChainError
from appliance.store import audit, trust_state
from appliance.store.db import connect

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    store = tmp_path / "store"
    for i in range(5):
        audit.append(store, "import", {"model": f"m{i}", "bytes": i * 100}, now=NOW)
    return store


def raw(store_dir: Path) -> sqlite3.Connection:
    return sqlite3.connect(store_dir / "index.sqlite", isolation_level=None)


def test_intact_chain_verifies(store_dir: Path) -> None:
    assert audit.verify(store_dir) == 5
    records = list(audit.records(store_dir))
    assert [r.seq for r in records] == [1, 2, 3, 4, 5]
    assert records[0].prev == audit.GENESIS
    assert all(b.prev == a.hash for a, b in itertools.pairwise(records))
    assert audit.read_head(store_dir) == (5, records[-1].hash)


def test_edited_details_are_caught(store_dir: Path) -> None:
    raw(store_dir).execute(
        "UPDATE audit SET details = ? WHERE seq = 3", ('{"bytes":0,"model":"m2"}',)
    )
    with pytest.raises(AuditChainError, match="record 3 was edited"):
        audit.verify(store_dir)


def test_edited_kind_or_time_is_caught(store_dir: Path) -> None:
    raw(store_dir).execute("UPDATE audit SET kind = 'pull' WHERE seq = 2")
    with pytest.raises(AuditChainError, match="record 2"):
        audit.verify(store_dir)


def test_removed_middle_record_is_caught(store_dir: Path) -> None:
    raw(store_dir).execute("DELETE FROM audit WHERE seq = 2")
    with pytest.raises(AuditChainError, match="record 2 is missing"):
        audit.verify(store_dir)


def test_removed_and_renumbered_record_is_caught(store_dir: Path) -> None:
    db = raw(store_dir)
    db.execute("DELETE FROM audit WHERE seq = 2")
    for seq in (3, 4, 5):
        db.execute("UPDATE audit SET seq = ? WHERE seq = ?", (seq - 1, seq))
    with pytest.raises(AuditChainError, match="record 2"):
        audit.verify(store_dir)


def test_reordered_records_are_caught(store_dir: Path) -> None:
    db = raw(store_dir)
    db.execute("UPDATE audit SET seq = 100 WHERE seq = 2")
    db.execute("UPDATE audit SET seq = 2 WHERE seq = 3")
    db.execute("UPDATE audit SET seq = 3 WHERE seq = 100")
    with pytest.raises(AuditChainError, match="removed or reordered"):
        audit.verify(store_dir)


def test_removed_newest_records_are_caught_by_the_head(store_dir: Path) -> None:
    raw(store_dir).execute("DELETE FROM audit WHERE seq >= 4")
    with pytest.raises(AuditChainError, match="4 to 5 were removed"):
        audit.verify(store_dir)


def test_rewritten_consistent_chain_is_caught_by_the_head(store_dir: Path) -> None:
    db = raw(store_dir)
    db.execute("DELETE FROM audit WHERE seq >= 5")
    # A forger re-hashes a replacement record 5 so the chain itself is consistent.
    prev = db.execute("SELECT hash FROM audit WHERE seq = 4").fetchone()[0]
    time = "2025-01-02T03:04:05Z"
    details = '{"bytes":0,"model":"forged"}'
    digest = audit.record_hash(5, time, "import", details, prev)
    db.execute("INSERT INTO audit VALUES (5, ?, 'import', ?, ?, ?)", (time, details, prev, digest))
    with pytest.raises(AuditChainError, match="record 5 differs"):
        audit.verify(store_dir)


def test_head_lagging_after_a_caller_transaction_is_accepted(store_dir: Path) -> None:
    db = connect(store_dir)
    db.execute("BEGIN IMMEDIATE")
    audit.append(store_dir, "delete", {"model": "x"}, conn=db, now=NOW)
    db.execute("COMMIT")
    db.close()
    head = audit.read_head(store_dir)
    assert head is not None and head[0] == 5
    assert audit.verify(store_dir) == 6
    head = audit.read_head(store_dir)
    assert head is not None and head[0] == 6


def test_malformed_head_file_is_an_audit_error(store_dir: Path) -> None:
    (store_dir / audit.HEAD_NAME).write_text("garbage\n")
    with pytest.raises(AuditChainError, match="malformed"):
        audit.verify(store_dir)


def test_empty_log_verifies(tmp_path: Path) -> None:
    assert audit.verify(tmp_path / "fresh") == 0


def test_record_times_are_rfc3339_utc_with_z(store_dir: Path) -> None:
    assert {r.time for r in audit.records(store_dir)} == {"2025-01-02T03:04:05Z"}


@pytest.fixture
def trusting_store(tmp_path: Path) -> Path:
    """A store that holds a trust root (whose install was audited)."""
    store = tmp_path / "trusting"
    signed = make_root()
    trust_state.install_first_root(store, signed.to_bytes(), signed.root.fingerprint, TRUST_NOW)
    assert audit.verify(store) == 1
    return store


def test_missing_head_on_a_store_that_holds_a_root_is_not_intact(
        trusting_store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (trusting_store / audit.HEAD_NAME).unlink()
    with pytest.raises(AuditChainError, match=r"head file .* is missing") as info:
        audit.verify(trusting_store)
    assert type(info.value) is AuditChainError
    # Never silently re-anchored: a second verify still refuses, and the CLI says exit 2.
    assert audit.read_head(trusting_store) is None
    assert main(["audit", "verify", "--store", str(trusting_store)]) == EXIT_REFUSED
    assert "AuditChainError" in capsys.readouterr().err


@pytest.mark.parametrize("keep_head", [False, True])
def test_emptied_log_on_a_store_that_holds_a_root_is_not_intact(
        trusting_store: Path, keep_head: bool) -> None:
    head = audit.read_head(trusting_store)
    raw(trusting_store).execute("DELETE FROM audit")
    if not keep_head:
        (trusting_store / audit.HEAD_NAME).unlink()
    with pytest.raises(AuditChainError) as info:
        audit.verify(trusting_store)
    assert type(info.value) is AuditChainError
    assert "the audit log is empty, but the store holds 1 trust root(s)" in str(info.value)
    assert audit.read_head(trusting_store) == (head if keep_head else None)


def test_head_is_rewritten_only_when_it_moves(store_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A transaction that appended nothing leaves the head file alone; a replaced head's
    rename is not made durable by a directory fsync (an older head only lags), a first one's
    is (a lost first head would read as a removed log)."""
    synced: list[Path] = []
    real_fsync_dir = fsutil.fsync_dir

    def fsync_dir(path: Path, **kw: bool) -> None:
        synced.append(path)
        real_fsync_dir(path, **kw)

    monkeypatch.setattr(fsutil, "fsync_dir", fsync_dir)
    before = (store_dir / audit.HEAD_NAME).stat().st_ino
    audit.sync_head(store_dir)
    assert (store_dir / audit.HEAD_NAME).stat().st_ino == before
    record = audit.append(store_dir, "import", {"model": "m5"}, now=NOW)
    assert audit.read_head(store_dir) == (6, record.hash)
    assert synced == []
    (store_dir / audit.HEAD_NAME).unlink()
    audit.sync_head(store_dir)
    assert audit.read_head(store_dir) == (6, record.hash)
    assert synced == [store_dir]
    assert audit.verify(store_dir) == 6
