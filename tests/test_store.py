"""The store: staged files, crash-safe publish, listing, local chunk lookup, removal, locking."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest
from store_helpers import add_origin, model_entry, origin, write_model

from appliance.errors import (
    IntegrityError,
    ModelNotFoundError,
    StoreError,
    UnsafePathError,
    UsageError,
)
from appliance.store import audit, layout
from appliance.store.records import get_model, list_models, parse_ref
from appliance.store.store import Store, jsonable


def payload(n: int, seed: int = 1) -> bytes:
    return bytes((i * 131 + seed * 7 + (i >> 9)) % 251 for i in range(n))


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


def test_publish_makes_a_read_only_verified_model(store_dir: Path) -> None:
    data = payload(300_000)
    model = model_entry("tiny", "f32", {"tiny.gguf": data})
    with Store(store_dir) as store:
        write_model(store, model, {"tiny.gguf": data})
    record = get_model(store_dir, "tiny")
    assert record.verified and record.state == "published"
    assert record.path == store_dir / "models" / "tiny" / "f32" / "tiny.gguf"
    assert record.path.read_bytes() == data
    assert stat.S_IMODE(record.path.stat().st_mode) == 0o444
    assert record.size == len(data)
    assert record.files[0].blake3 is not None and record.verified_at is not None
    assert list((store_dir / "staging").iterdir()) == []
    assert [m.ref for m in list_models(store_dir)] == ["tiny:f32"]


def test_half_written_model_is_never_listed_or_servable(store_dir: Path) -> None:
    data = payload(300_000)
    model = model_entry("tiny", "f32", {"tiny.gguf": data})
    with Store(store_dir) as store:
        write_model(store, model, {"tiny.gguf": data}, limit_chunks=2)
        assert store.list_models() == []
        assert [m.state for m in store.list_models(include_importing=True)] == ["importing"]
    with pytest.raises(ModelNotFoundError):
        get_model(store_dir, "tiny")
    assert not (store_dir / "models" / "tiny").exists()


def test_chunk_is_marked_done_only_after_flush(store_dir: Path) -> None:
    data = payload(200_000)
    model = model_entry("m", "v", {"a.bin": data})
    with Store(store_dir, flush_bytes=1 << 30) as store:
        add_origin(store, origin())
        model_id = store.begin_model(model, origin().manifest_hash)
        assert model_id is not None
        (staged,) = store.stage_files(model_id)
        first = staged.pending()[0]
        staged.write_chunk(first.idx, data[: first.length])
        other = sqlite3.connect(store_dir / "index.sqlite")
        done = other.execute("SELECT COUNT(*) FROM chunks WHERE done = 1").fetchone()[0]
        assert done == 0  # written, not yet fsynced: the index must not claim it
        staged.flush()
        done = other.execute("SELECT COUNT(*) FROM chunks WHERE done = 1").fetchone()[0]
        assert done == 1
        other.close()
        staged.close()


def test_wrong_chunk_bytes_are_refused(store_dir: Path) -> None:
    data = payload(200_000)
    model = model_entry("m", "v", {"a.bin": data})
    with Store(store_dir) as store:
        add_origin(store, origin())
        model_id = store.begin_model(model, origin().manifest_hash)
        assert model_id is not None
        (staged,) = store.stage_files(model_id)
        chunk = staged.pending()[0]
        bad = bytearray(data[: chunk.length])
        bad[5] ^= 1
        with pytest.raises(IntegrityError) as info:
            staged.write_chunk(chunk.idx, bytes(bad))
        assert info.value.chunk == chunk.digest
        staged.close()
        assert len(staged.pending()) == len(model.files[0].chunks)


def test_resume_skips_durable_chunks(store_dir: Path) -> None:
    data = payload(640 * 1024)
    model = model_entry("m", "v", {"a.bin": data})
    with Store(store_dir, flush_bytes=64 * 1024) as store:
        first_id = write_model(store, model, {"a.bin": data}, limit_chunks=4, publish=False)
    with Store(store_dir) as store:
        add_origin(store, origin())
        model_id = store.begin_model(model, origin().manifest_hash)
        assert model_id == first_id
        (staged,) = store.stage_files(model_id)
        assert [c.idx for c in staged.pending()] == list(range(4, 10))
        for chunk in staged.pending():
            staged.write_chunk(chunk.idx, data[chunk.offset : chunk.offset + chunk.length])
        assert staged.publish() is True
    assert get_model(store_dir, "m:v").path.read_bytes() == data


def test_publish_cut_between_rename_and_commit_is_finished(store_dir: Path) -> None:
    data = payload(300_000)
    model = model_entry("m", "v", {"dir/a.bin": data})
    with Store(store_dir) as store:
        model_id = write_model(store, model, {"dir/a.bin": data}, publish=False)
        assert model_id is not None
        (staged,) = store.stage_files(model_id)
        # What a SIGKILL right after publish's rename leaves: the file in place, index not told.
        staged.final.parent.mkdir(parents=True)
        os.rename(staged.staged, staged.final)
    with Store(store_dir) as store:
        assert store.list_models() == []
        (again,) = store.stage_files(model_id)
        assert again.is_published
    assert get_model(store_dir, "m").files[0].location.read_bytes() == data


def test_corrupt_file_left_by_a_cut_publish_is_quarantined_and_redone(store_dir: Path) -> None:
    data = payload(300_000)
    model = model_entry("m", "v", {"a.bin": data})
    with Store(store_dir) as store:
        model_id = write_model(store, model, {"a.bin": data}, publish=False)
        assert model_id is not None
        (staged,) = store.stage_files(model_id)
        staged.final.parent.mkdir(parents=True)
        os.rename(staged.staged, staged.final)
        with open(staged.final, "r+b") as f:
            f.seek(70_000)
            f.write(b"\xff")
    with Store(store_dir) as store:
        (again,) = store.stage_files(model_id)
        assert not again.is_published
        assert len(again.pending()) == len(model.files[0].chunks)
    assert len(list((store_dir / "quarantine").iterdir())) == 1
    assert [r.kind for r in audit.records(store_dir)] == ["quarantine"]


def test_lost_staged_file_restarts_that_file(store_dir: Path) -> None:
    data = payload(300_000)
    model = model_entry("m", "v", {"a.bin": data})
    with Store(store_dir, flush_bytes=1) as store:
        model_id = write_model(store, model, {"a.bin": data}, limit_chunks=3, publish=False)
        assert model_id is not None
    layout.staged_path(store_dir, 1).unlink()
    with Store(store_dir) as store:
        (staged,) = store.stage_files(model_id)
        assert len(staged.pending()) == len(model.files[0].chunks)


def test_staging_a_new_file_commits_nothing(store_dir: Path) -> None:
    """A file never staged has no chunk marked done: ``stage_files`` leaves the index as it is
    (no commit, so no WAL sync) where a lost staged file's marks are cleared (above)."""
    data = payload(200_000)
    model = model_entry("m", "v", {"a.bin": data})
    with Store(store_dir) as store:
        add_origin(store, origin())
        model_id = store.begin_model(model, origin().manifest_hash)
        assert model_id is not None
        statements: list[str] = []
        store.conn.set_trace_callback(statements.append)
        (staged,) = store.stage_files(model_id)
        store.conn.set_trace_callback(None)
        assert [s for s in statements if s.split()[0] in ("BEGIN", "COMMIT", "UPDATE")] == []
        assert len(staged.pending()) == len(model.files[0].chunks)


def test_local_chunks_are_found_and_rechecked(store_dir: Path) -> None:
    data = payload(300_000)
    model = model_entry("m", "v", {"a.bin": data})
    digest = model.files[0].chunks[1].digest
    with Store(store_dir) as store:
        assert store.read_local_chunk(digest) is None
        write_model(store, model, {"a.bin": data})
        (loc,) = store.find_chunk(digest)
        assert (loc.offset, loc.length) == (65536, 65536)
        assert store.read_local_chunk(digest) == data[65536:131072]
        assert digest in store.held_digests()
        path = get_model(store_dir, "m").path
        path.chmod(0o644)
        with open(path, "r+b") as f:
            f.seek(70_000)
            f.write(b"\x00" if data[70_000] else b"\x01")
        assert store.read_local_chunk(digest) is None


def test_staged_chunks_are_offered_before_publish(store_dir: Path) -> None:
    data = payload(300_000)
    model = model_entry("m", "v", {"a.bin": data})
    with Store(store_dir, flush_bytes=1) as store:
        write_model(store, model, {"a.bin": data}, limit_chunks=2, publish=False)
        first = model.files[0].chunks[0]
        assert store.read_local_chunk(first.digest) == data[: first.length]
        assert model.files[0].chunks[3].digest not in store.held_digests()


def test_identical_model_is_present_and_conflicting_one_refused(store_dir: Path) -> None:
    data = payload(100_000)
    model = model_entry("m", "v", {"a.bin": data})
    other = model_entry("m", "v", {"a.bin": payload(100_000, seed=2)})
    with Store(store_dir) as store:
        write_model(store, model, {"a.bin": data})
        assert [p.action for p in store.plan([model])] == ["present"]
        assert store.begin_model(model, origin().manifest_hash) is None
        with pytest.raises(StoreError, match="models rm"):
            store.plan([other])
        with pytest.raises(StoreError):
            store.begin_model(other, origin().manifest_hash)


def test_unfinished_import_is_replaced_by_a_different_one(store_dir: Path) -> None:
    old = payload(200_000)
    new = payload(200_000, seed=3)
    with Store(store_dir, flush_bytes=1) as store:
        write_model(
            store,
            model_entry("m", "v", {"a.bin": old}),
            {"a.bin": old},
            limit_chunks=2,
            publish=False,
        )
        write_model(store, model_entry("m", "v", {"a.bin": new}), {"a.bin": new})
    assert get_model(store_dir, "m").path.read_bytes() == new
    assert list((store_dir / "staging").iterdir()) == []


def test_remove_model_deletes_files_and_audits(store_dir: Path) -> None:
    data = payload(100_000)
    with Store(store_dir) as store:
        write_model(store, model_entry("org/m", "v", {"a.bin": data}), {"a.bin": data})
        assert (store_dir / "models" / "org~m" / "v" / "a.bin").exists()
        removed = store.remove_model("org/m")
        assert removed.ref == "org/m:v"
        assert store.list_models() == []
        with pytest.raises(ModelNotFoundError):
            store.remove_model("org/m")
    assert list((store_dir / "models").iterdir()) == []
    (record,) = list(audit.records(store_dir))
    assert record.kind == "delete" and record.details["model"] == "org/m"
    assert audit.verify(store_dir) == 1


def test_bare_name_with_two_versions_is_ambiguous(store_dir: Path) -> None:
    a, b = payload(1000), payload(1000, seed=5)
    with Store(store_dir) as store:
        write_model(store, model_entry("m", "q4", {"a.bin": a}), {"a.bin": a})
        write_model(store, model_entry("m", "q8", {"a.bin": b}), {"a.bin": b})
    with pytest.raises(UsageError):
        get_model(store_dir, "m")
    assert get_model(store_dir, "m:q8").path.read_bytes() == b
    with pytest.raises(ModelNotFoundError):
        get_model(store_dir, "m:q5")


@pytest.mark.parametrize("ref", ["", ":v", "m:"])
def test_bad_model_reference_is_a_usage_error(ref: str) -> None:
    with pytest.raises(UsageError):
        parse_ref(ref)


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../../b", ""])
def test_unsafe_paths_never_reach_the_disk(path: str) -> None:
    with pytest.raises(UnsafePathError):
        layout.published_path(Path("/s"), "m", "v", path)


def test_get_model_refuses_a_resized_file(store_dir: Path) -> None:
    data = payload(1000)
    with Store(store_dir) as store:
        write_model(store, model_entry("m", "v", {"a.bin": data}), {"a.bin": data})
    path = get_model(store_dir, "m").path
    path.chmod(0o644)
    path.write_bytes(data + b"x")
    with pytest.raises(StoreError, match="store verify"):
        get_model(store_dir, "m")


def test_second_writer_is_told_the_store_is_busy(store_dir: Path) -> None:
    with layout.writer_lock(store_dir, "import"):
        second = layout.writer_lock(store_dir, "gc")
        with pytest.raises(StoreError, match="busy"):
            second.__enter__()
    with layout.writer_lock(store_dir, "gc"):
        pass


def test_manifest_and_signatures_are_kept_for_peers(store_dir: Path) -> None:
    bundle = origin("m7", 7)
    with Store(store_dir) as store:
        add_origin(store, bundle)
        assert store.manifest(bundle.manifest_hash) == (
            bundle.manifest_bytes,
            bundle.signatures,
        )
        assert store.pending_imports() == [bundle.manifest_hash]
        store.finish_import(bundle.manifest_hash, None)
        assert store.pending_imports() == []
        assert store.manifest("0" * 64) is None


def test_finishing_a_complete_import_again_commits_nothing(store_dir: Path) -> None:
    """A pull or import that finds everything present finishes an import already complete:
    no transaction (the acceptance has just stamped it)."""
    bundle = origin("m8", 8)
    with Store(store_dir) as store:
        add_origin(store, bundle)
        store.finish_import(bundle.manifest_hash, None)
        add_origin(store, bundle)
        statements: list[str] = []
        store.conn.set_trace_callback(statements.append)
        store.finish_import(bundle.manifest_hash, None)
        store.conn.set_trace_callback(None)
        assert [s for s in statements if s.split()[0] in ("BEGIN", "COMMIT", "UPDATE")] == []
        assert store.pending_imports() == []


def test_jsonable_flattens_manifest_facts() -> None:
    model = model_entry("m", "v", {"a.bin": b"x"})
    value = jsonable(model.provenance)
    assert value == {"builder": "tests", "sources": []}
    assert jsonable(None) is None
