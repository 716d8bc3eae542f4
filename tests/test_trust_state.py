"""appliance.store.trust_state: installed roots and channel high-water marks in real SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest
from trust_helpers import DAY, NOW, make_root

from appliance.errors import (
    FingerprintMismatchError,
    NoTrustRootError,
    RollbackError,
    RotationError,
    StoreError,
    ThresholdError,
    TrustError,
    UsageError,
)
from appliance.store import audit, trust_state
from appliance.store.db import connect


def _kinds(store: Path) -> list[str]:
    return [r.kind for r in audit.records(store)]


def test_fresh_store_has_no_root(tmp_path: Path) -> None:
    assert trust_state.installed_root(tmp_path) is None
    with pytest.raises(NoTrustRootError):
        trust_state.require_root(tmp_path)
    with pytest.raises(NoTrustRootError):
        trust_state.update_root(tmp_path, [], NOW)


def test_install_first_root_and_update(tmp_path: Path) -> None:
    v1 = make_root()
    root = trust_state.install_first_root(tmp_path, v1.to_bytes(), v1.root.fingerprint, NOW)
    assert root == v1.root
    assert trust_state.installed_root(tmp_path) == v1.root
    v2 = make_root(version=2, root_keys=("r1", "r2", "r4"))
    assert trust_state.update_root(tmp_path, [v1, v2], NOW).version == 2
    assert [s.root.version for s in trust_state.installed_chain(tmp_path)] == [1, 2]
    assert trust_state.installed_root(tmp_path) == v2.root
    assert [v for v, _, _ in trust_state.installed_versions(tmp_path)] == [1, 2]
    assert _kinds(tmp_path) == ["trust-install", "trust-update"]
    assert audit.verify(tmp_path) == 2
    # Nothing newer: no change, no audit record.
    assert trust_state.update_root(tmp_path, [v1, v2], NOW).version == 2
    assert len(_kinds(tmp_path)) == 2


def test_install_is_idempotent_but_never_replaces(tmp_path: Path) -> None:
    v1 = make_root()
    trust_state.install_first_root(tmp_path, v1.to_bytes(), v1.root.fingerprint, NOW)
    trust_state.install_first_root(tmp_path, v1.to_bytes(), v1.root.fingerprint, NOW)
    other = make_root(publishers={"p1": ("*",)})
    with pytest.raises(TrustError):
        trust_state.install_first_root(tmp_path, other.to_bytes(), other.root.fingerprint, NOW)
    assert trust_state.installed_root(tmp_path) == v1.root


def test_wrong_fingerprint_is_refused_and_audited(tmp_path: Path) -> None:
    v1 = make_root()
    with pytest.raises(FingerprintMismatchError):
        trust_state.install_first_root(tmp_path, v1.to_bytes(), "1" * 32, NOW)
    assert trust_state.installed_root(tmp_path) is None
    records = list(audit.records(tmp_path))
    assert [r.kind for r in records] == ["refusal"]
    assert records[0].details["error"] == "FingerprintMismatchError"


def test_right_fingerprint_but_unsigned_is_refused(tmp_path: Path) -> None:
    v1 = make_root(sign_with=("r1",))
    with pytest.raises(ThresholdError):
        trust_state.install_first_root(tmp_path, v1.to_bytes(), v1.root.fingerprint, NOW)
    assert trust_state.installed_root(tmp_path) is None


def test_expired_first_root_needs_reason_and_is_audited(tmp_path: Path) -> None:
    v1 = make_root(created=NOW - 400 * DAY, expires=NOW - DAY)
    with pytest.raises(UsageError):
        trust_state.install_first_root(
            tmp_path, v1.to_bytes(), v1.root.fingerprint, NOW, allow_expired=True
        )
    assert trust_state.installed_root(tmp_path) is None
    trust_state.install_first_root(
        tmp_path, v1.to_bytes(), v1.root.fingerprint, NOW, allow_expired=True,
        reason="site clock drift, ticket 42",
    )
    override = [r for r in audit.records(tmp_path) if r.kind == "override"]
    assert len(override) == 1
    details = override[0].details
    assert details["reason"] == "site clock drift, ticket 42"
    assert details["user"] and details["host_time"] == "2030-06-01T12:00:00Z"
    assert details["expires"] == "2030-05-31T12:00:00Z"


def test_update_refuses_a_different_copy_of_a_held_version(tmp_path: Path) -> None:
    v1 = make_root()
    trust_state.install_first_root(tmp_path, v1.to_bytes(), v1.root.fingerprint, NOW)
    v2 = make_root(version=2)
    trust_state.update_root(tmp_path, [v1, v2], NOW)
    forked_v1 = make_root(publishers={"p1": ("*",)})
    v3 = make_root(version=3)
    with pytest.raises(RotationError):
        trust_state.update_root(tmp_path, [forked_v1, v2, v3], NOW)
    assert trust_state.installed_root(tmp_path) == v2.root
    assert _kinds(tmp_path)[-1] == "refusal"


def test_failed_update_changes_nothing(tmp_path: Path) -> None:
    v1 = make_root()
    trust_state.install_first_root(tmp_path, v1.to_bytes(), v1.root.fingerprint, NOW)
    v2 = make_root(version=2)
    v3_bad = make_root(version=3, sign_with=("r1",))
    with pytest.raises(RotationError):
        trust_state.update_root(tmp_path, [v2, v3_bad], NOW)
    assert trust_state.installed_root(tmp_path) == v1.root


def test_corrupt_stored_root_is_store_error(tmp_path: Path) -> None:
    v1 = make_root()
    trust_state.install_first_root(tmp_path, v1.to_bytes(), v1.root.fingerprint, NOW)
    db = connect(tmp_path)
    db.execute("UPDATE trust_roots SET body = ?", (b"format: nonsense\n",))
    db.close()
    with pytest.raises(StoreError):
        trust_state.installed_root(tmp_path)
    db = connect(tmp_path)
    db.execute("UPDATE trust_roots SET body = ?, fingerprint = ?", (v1.to_bytes(), "0" * 39))
    db.close()
    with pytest.raises(StoreError):
        trust_state.installed_root(tmp_path)


def test_channel_high_water_mark(tmp_path: Path) -> None:
    assert trust_state.channel_state(tmp_path, "site") is None
    trust_state.record_channel(tmp_path, "site", 3, "h3", now=NOW)
    trust_state.record_channel(tmp_path, "site", 3, "h3")
    assert trust_state.channel_state(tmp_path, "site") == (3, "h3")
    with pytest.raises(RollbackError):
        trust_state.record_channel(tmp_path, "site", 2, "h2")
    with pytest.raises(RollbackError):
        trust_state.record_channel(tmp_path, "site", 3, "other")
    trust_state.record_channel(tmp_path, "site", 9, "h9")
    trust_state.record_channel(tmp_path, "lab", 1, "l1")
    assert trust_state.channel_state(tmp_path, "site") == (9, "h9")
    assert [c[:2] for c in trust_state.channels(tmp_path)] == [("lab", 1), ("site", 9)]
    with pytest.raises(UsageError):
        trust_state.record_channel(tmp_path, "", 1, "x")


def test_record_channel_inside_callers_transaction(tmp_path: Path) -> None:
    db = connect(tmp_path)
    db.execute("BEGIN IMMEDIATE")
    trust_state.record_channel(tmp_path, "site", 4, "h4", conn=db)
    db.execute("ROLLBACK")  # the import failed later: the mark must not move
    db.close()
    assert trust_state.channel_state(tmp_path, "site") is None
    db = connect(tmp_path)
    db.execute("BEGIN IMMEDIATE")
    trust_state.record_channel(tmp_path, "site", 4, "h4", conn=db)
    db.execute("COMMIT")
    db.close()
    assert trust_state.channel_state(tmp_path, "site") == (4, "h4")


def test_sqlite_failure_is_store_error(tmp_path: Path) -> None:
    db = connect(tmp_path)
    db.execute("DROP TABLE channels")
    db.execute("CREATE TABLE channels (unrelated TEXT)")  # survives CREATE IF NOT EXISTS
    db.close()
    with pytest.raises(StoreError):
        trust_state.channel_state(tmp_path, "site")
    with pytest.raises(StoreError):
        trust_state.record_channel(tmp_path, "site", 1, "h1")


def test_install_roots_by_fingerprint_then_the_chain_in_any_order(tmp_path: Path) -> None:
    v1 = make_root()
    v2 = make_root(version=2, root_keys=("r1", "r2", "r4"))
    first = trust_state.install_roots(tmp_path, [v2, v1], v1.root.fingerprint, NOW)
    assert (first.first, first.start, first.root) == (v1.root, v1.root, v2.root)
    again = trust_state.install_roots(tmp_path, [v2], None, NOW)  # nothing newer: stays
    assert again.first is None and again.start == again.root == v2.root
    assert _kinds(tmp_path) == ["trust-install", "trust-update"]


def test_install_roots_refuses_a_fingerprint_no_file_has_and_audits_it(tmp_path: Path) -> None:
    v1 = make_root()
    with pytest.raises(FingerprintMismatchError) as refused:
        trust_state.install_roots(tmp_path, [v1], "0" * 32, NOW)
    assert v1.root.fingerprint not in str(refused.value)  # never shown to copy from
    assert _kinds(tmp_path) == ["refusal"] and trust_state.installed_root(tmp_path) is None
    with pytest.raises(UsageError, match="--allow-expired needs --reason"):
        trust_state.install_roots(tmp_path, [v1], v1.root.fingerprint, NOW,
                                  allow_expired=True)


def test_read_root_file_names_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such trust root file"):
        trust_state.read_root_file(tmp_path / "nope.yaml")
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (2 << 20))
    with pytest.raises(UsageError, match="too big to be a trust root file"):
        trust_state.read_root_file(big)
    (tmp_path / "root-1.yaml").write_bytes(make_root().to_bytes())
    assert trust_state.read_root_file(tmp_path / "root-1.yaml").root.version == 1
