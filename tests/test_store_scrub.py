"""store verify (re-hash, quarantine, never delete) and store gc (leftovers, orphans)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from store_helpers import model_entry, write_model

from appliance.errors import StoreError
from appliance.store import audit, layout
from appliance.store.records import find_model, get_model, list_models
from appliance.store.scrub import gc, quarantine_damaged, verify_store
from appliance.store.store import Store


def payload(n: int, seed: int = 1) -> bytes:
    return bytes((i * 97 + seed * 13 + (i >> 11)) % 253 for i in range(n))


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


def flip(path: Path, offset: int) -> None:
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def two_models(store_dir: Path) -> tuple[bytes, bytes]:
    a, b = payload(300_000), payload(200_000, seed=2)
    with Store(store_dir) as store:
        write_model(store, model_entry("a", "v", {"a.gguf": a}), {"a.gguf": a})
        write_model(store, model_entry("b", "v", {"b.gguf": b}), {"b.gguf": b})
    return a, b


def test_clean_store_verifies(store_dir: Path) -> None:
    two_models(store_dir)
    seen: list[tuple[int, int]] = []
    report = verify_store(store_dir, progress=lambda d, t: seen.append((d, t)))
    assert report.ok and report.files_checked == 2 and report.bytes_checked == 500_000
    assert seen[-1] == (500_000, 500_000)
    assert list(audit.records(store_dir)) == []


def test_flipped_byte_is_quarantined_not_deleted(store_dir: Path) -> None:
    a, _ = two_models(store_dir)
    path = get_model(store_dir, "a").path
    flip(path, 200_000)
    report = verify_store(store_dir)
    (bad,) = report.corrupt
    chunk = model_entry("a", "v", {"a.gguf": a}).files[0].chunks[3]
    assert (bad.model, bad.path, bad.chunk, bad.offset) == ("a", "a.gguf", chunk.digest, 196_608)
    assert not path.exists()
    assert bad.quarantined_to is not None and bad.quarantined_to.parent.name == "quarantine"
    kept = bad.quarantined_to.read_bytes()
    assert len(kept) == len(a) and kept != a  # the corrupt bytes, kept as evidence
    # Listed, but not verified, not servable, not offered to peers.
    state = {m.name: m.verified for m in list_models(store_dir)}
    assert state == {"a": False, "b": True}
    with pytest.raises(StoreError, match="quarantined"):
        get_model(store_dir, "a")
    with Store(store_dir) as store:
        assert chunk.digest not in store.held_digests()
    (record,) = list(audit.records(store_dir))
    assert record.kind == "quarantine" and record.details["chunk"] == chunk.digest
    assert audit.verify(store_dir) == 1
    # Importing the same model again heals it.
    with Store(store_dir) as store:
        write_model(store, model_entry("a", "v", {"a.gguf": a}), {"a.gguf": a})
    assert get_model(store_dir, "a").path.read_bytes() == a
    assert verify_store(store_dir).ok


def test_truncated_and_missing_files_are_reported(store_dir: Path) -> None:
    two_models(store_dir)
    a_path = get_model(store_dir, "a").path
    a_path.chmod(0o644)
    os.truncate(a_path, 1000)
    get_model(store_dir, "b").path.unlink()
    report = verify_store(store_dir)
    reasons = {c.model: c for c in report.corrupt}
    assert "expected 300000" in reasons["a"].reason
    assert reasons["b"].reason == "file is missing" and reasons["b"].quarantined_to is None
    assert [m.verified for m in list_models(store_dir)] == [False, False]


def test_quarantine_move_cut_by_a_crash_is_finished(store_dir: Path) -> None:
    two_models(store_dir)
    path = get_model(store_dir, "a").path
    flip(path, 10)
    verify_store(store_dir)
    # Put the file back where it was, as if the process died after the index commit.
    (moved,) = list((store_dir / "quarantine").iterdir())
    os.rename(moved, path)
    gc(store_dir)
    assert not path.exists() and moved.exists()


def test_gc_removes_orphans_and_keeps_resumable_imports(store_dir: Path) -> None:
    two_models(store_dir)
    pending = payload(300_000, seed=9)
    with Store(store_dir, flush_bytes=1) as store:
        write_model(
            store,
            model_entry("p", "v", {"p.gguf": pending}),
            {"p.gguf": pending},
            limit_chunks=2,
            publish=False,
        )
    staging = store_dir / "staging"
    (kept,) = list(staging.iterdir())
    (staging / "999.part").write_bytes(b"x" * 10)
    (staging / "junk.tmp").write_bytes(b"y" * 5)
    orphan = store_dir / "models" / "gone" / "v" / "gone.gguf"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"z" * 7)
    (store_dir / "quarantine" / "evidence").write_bytes(b"q")
    report = gc(store_dir)
    assert sorted(p.name for p in report.removed) == ["999.part", "gone.gguf", "junk.tmp"]
    assert report.freed_bytes == 22 and report.pending == ["p:v"]
    assert kept.exists() and not (store_dir / "models" / "gone").exists()
    assert (store_dir / "quarantine" / "evidence").exists()
    assert [m.name for m in list_models(store_dir)] == ["a", "b"]

    report = gc(store_dir, abandon=True)
    assert report.abandoned == ["p:v"] and [p.name for p in report.removed] == [kept.name]
    assert list(staging.iterdir()) == []
    with pytest.raises(StoreError):
        find_model(store_dir, "p", include_importing=True)
    assert [r.kind for r in audit.records(store_dir)] == ["delete"]


def test_gc_finishes_a_publish_cut_before_its_commit(store_dir: Path) -> None:
    data = payload(100_000)
    with Store(store_dir) as store:
        model_id = write_model(
            store, model_entry("m", "v", {"m.gguf": data}), {"m.gguf": data}, publish=False
        )
        assert model_id is not None
        (staged,) = store.stage_files(model_id)
        staged.final.parent.mkdir(parents=True)
        os.rename(staged.staged, staged.final)
    report = gc(store_dir)
    assert report.removed == []
    assert get_model(store_dir, "m").path.read_bytes() == data


def test_verify_while_another_writer_runs_is_refused(store_dir: Path) -> None:
    two_models(store_dir)
    with layout.writer_lock(store_dir, "import"), pytest.raises(StoreError, match="busy"):
        verify_store(store_dir)


def test_a_seed_finding_one_damaged_chunk_quarantines_that_file(store_dir: Path) -> None:
    """Issue 14 item 3, seed side: the file is quarantined as store verify would, audited,
    and its chunks are no longer advertised; good copies and other models are untouched."""
    a, b = two_models(store_dir)
    path = get_model(store_dir, "a").path
    flip(path, 200_000)
    bad_chunk = model_entry("a", "v", {"a.gguf": a}).files[0].chunks[3]
    good_chunk = model_entry("b", "v", {"b.gguf": b}).files[0].chunks[0]
    assert quarantine_damaged(store_dir, good_chunk.digest) == []
    (bad,) = quarantine_damaged(store_dir, bad_chunk.digest)
    assert (bad.model, bad.path, bad.chunk, bad.offset) == ("a", "a.gguf", bad_chunk.digest,
                                                             196_608)
    assert bad.quarantined_to is not None and bad.quarantined_to.exists() and not path.exists()
    with Store(store_dir) as store:
        held = store.held_digests()
    assert bad_chunk.digest not in held and good_chunk.digest in held
    assert {m.name: m.verified for m in list_models(store_dir)} == {"a": False, "b": True}
    assert [r.kind for r in audit.records(store_dir)] == ["quarantine"]
    assert verify_store(store_dir).ok and audit.verify(store_dir) == 1
    assert quarantine_damaged(store_dir, bad_chunk.digest) == []  # nothing left to find


def test_a_damaged_staged_chunk_is_forgotten_and_fetched_again(store_dir: Path) -> None:
    data = payload(300_000)
    entry = model_entry("a", "v", {"a.gguf": data})
    with Store(store_dir) as store:
        write_model(store, entry, {"a.gguf": data}, publish=False, limit_chunks=2)
    second = entry.files[0].chunks[1]
    with Store(store_dir) as store:
        [staged] = store.stage_files(store.conn.execute("SELECT id FROM models").fetchone()[0])
        flip(staged.staged, second.offset + 7)
    (reset,) = quarantine_damaged(store_dir, second.digest)
    assert reset.chunk == second.digest and reset.quarantined_to is None
    with Store(store_dir) as store:
        held = store.held_digests()
    assert second.digest not in held and entry.files[0].chunks[0].digest in held
    assert [r.kind for r in audit.records(store_dir)] == ["quarantine"]
