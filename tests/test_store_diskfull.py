"""Disk full, on a real small filesystem (a tmpfs mounted by the test; we run as root).

When mounting is not permitted the tests are skipped and say why: a size-limited directory
cannot produce a real ENOSPC.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from store_helpers import add_origin, model_entry, origin, small_tmpfs, write_model

from appliance.errors import DiskFullError
from appliance.store import layout
from appliance.store.records import get_model
from appliance.store.store import Store

MiB = 1024 * 1024


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    try:
        with small_tmpfs(tmp_path / "fs", 20) as mount:
            yield mount
    except OSError as e:
        pytest.skip(str(e))


def fill(path: Path, leave: int) -> None:
    """Fill the filesystem holding ``path`` until ``leave`` bytes are free."""
    free = layout.free_bytes(path.parent)
    with open(path, "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def test_free_space_check_says_how_much_is_needed(small_fs: Path) -> None:
    with pytest.raises(DiskFullError, match=r"needs 31\.5 MB .* only 2\d\.\d MB is free"):
        layout.check_free_space(small_fs, 30 * MiB, "importing m:v")
    layout.check_free_space(small_fs, 10 * MiB, "importing m:v")


def test_preallocation_fails_cleanly_and_gives_the_space_back(small_fs: Path) -> None:
    store_dir = small_fs / "store"
    data = os.urandom(30 * MiB)
    model = model_entry("big", "v", {"big.gguf": data}, chunk_size=1 * MiB)
    with Store(store_dir) as store:
        add_origin(store, origin())
        model_id = store.begin_model(model, origin().manifest_hash)
        assert model_id is not None
        (staged,) = store.stage_files(model_id)
        free_before = layout.free_bytes(store_dir)
        with pytest.raises(DiskFullError, match="disk is full"):
            staged.open()
        assert not staged.staged.exists()
        assert layout.free_bytes(store_dir) >= free_before - MiB
        assert staged.done_bytes() == 0
        assert store.list_models() == []


def test_index_full_is_a_disk_full_error_and_the_store_recovers(small_fs: Path) -> None:
    store_dir = small_fs / "store"
    data = os.urandom(4 * MiB)
    model = model_entry("m", "v", {"m.gguf": data}, chunk_size=64 * 1024)
    filler = small_fs / "filler"
    with Store(store_dir, flush_bytes=64 * 1024) as store:
        add_origin(store, origin())
        model_id = store.begin_model(model, origin().manifest_hash)
        assert model_id is not None
        (staged,) = store.stage_files(model_id)
        staged.open()  # preallocated: chunk writes themselves can no longer hit ENOSPC
        fill(filler, 0)
        with pytest.raises(DiskFullError, match="index") as info:
            for chunk in staged.pending():
                staged.write_chunk(chunk.idx, data[chunk.offset : chunk.offset + chunk.length])
        staged.abort()
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    filler.unlink()
    with Store(store_dir) as store:
        write_model(store, model, {"m.gguf": data})
    assert get_model(store_dir, "m").path.read_bytes() == data
