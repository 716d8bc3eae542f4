"""Importing into a filesystem that is too small: a real tmpfs mounted by the test (as root).

Skipped, saying why, where mounting is not permitted: a size-limited directory cannot
produce a real ENOSPC.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from bundle_helpers import NOW, build, make_sources
from importer_helpers import check_consistent
from store_helpers import small_tmpfs
from trust_helpers import trusted_store

from appliance.errors import DiskFullError
from appliance.importer import import_media
from appliance.store import layout
from appliance.store.records import get_model, list_models
from appliance.store.trust_state import channel_state

MIB = 1 << 20


@pytest.fixture(scope="module")
def signed_media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("bundle")
    make_sources(base, random_mib=16)
    build(base)
    return base / "media"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    try:
        with small_tmpfs(tmp_path / "fs", 12) as mount:
            yield mount
    except OSError as e:
        pytest.skip(str(e))


def grow(mount: Path, size_mb: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_mb}m", str(mount)], check=True)


def test_too_small_is_refused_up_front_then_succeeds_with_space(
    signed_media: Path, small_fs: Path
) -> None:
    store = trusted_store(small_fs / "store")
    with pytest.raises(DiskFullError, match=r"needs 17\.\d MB .* free") as info:
        import_media(store, [signed_media], now=NOW)
    assert "importing site-models #1" in str(info.value)
    assert list_models(store, include_importing=True) == []
    assert list((store / "staging").iterdir()) == []
    assert channel_state(store, "site-models") is None  # nothing accepted yet
    check_consistent(store)
    grow(small_fs, 40)
    result = import_media(store, [signed_media], now=NOW)
    assert result.complete
    assert get_model(store, "acme/tiny").verified


def test_disk_filled_during_the_import_leaves_a_resumable_store(
    signed_media: Path, small_fs: Path
) -> None:
    grow(small_fs, 40)
    store = trusted_store(small_fs / "store")
    filler = small_fs / "filler"

    def fill_up(done: int, total: int) -> None:
        if done > 0 and not filler.exists():
            with open(filler, "wb") as f:
                f.write(b"\0" * max(0, layout.free_bytes(small_fs)))

    with pytest.raises(DiskFullError):
        import_media(store, [signed_media], now=NOW, progress=fill_up, flush_bytes=1)
    check_consistent(store)
    assert list_models(store) == []
    filler.unlink()
    result = import_media(store, [signed_media], now=NOW)
    assert result.complete
    assert check_consistent(store)["published_files"] == 2
