"""Raw chunks copied from packs in the kernel: exact bytes, tamper refused, fallbacks."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from bundle_helpers import NOW, build, flip_byte, make_sources, trusted, write_recipe
from trust_helpers import trusted_store

from appliance.bundle.reader import open_media
from appliance.errors import IntegrityError
from appliance.importer import import_media
from appliance.store import kernelcopy
from appliance.store.db import connect
from appliance.store.records import get_model, list_models

MIB = 1 << 20


@pytest.fixture(scope="module")
def raw_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``models/`` (8 MiB of random weights: stored raw, in chunks well above
    ``MIN_KERNEL_COPY``; notes, compressed) and ``media/``, one volume."""
    base = tmp_path_factory.mktemp("raw")
    make_sources(base, random_mib=8)
    build(base)
    return base


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return trusted_store(tmp_path / "store")


def _count(monkeypatch: pytest.MonkeyPatch, name: str,
           replace: Callable[..., Any] | None = None) -> list[int]:
    """Count calls of ``os.<name>`` (optionally replaced) while the test runs."""
    calls: list[int] = []
    real = getattr(os, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return (replace or real)(*args, **kwargs)

    monkeypatch.setattr(os, name, spy)
    return calls


def _refuse(code: int) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError(code, os.strerror(code))
    return refuse


def _assert_imported(store: Path, base: Path) -> None:
    model = get_model(store, "acme/tiny")
    assert model.state == "published"
    for f in model.files:
        assert f.location.read_bytes() == (base / "models" / f.path).read_bytes()


def test_raw_chunks_are_copied_in_the_kernel_and_land_exactly(
    raw_bundle: Path, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copies = _count(monkeypatch, "copy_file_range")
    result = import_media(store, [raw_bundle / "media"], now=NOW)
    assert result.complete
    assert copies, "no chunk took the kernel-copy path"
    _assert_imported(store, raw_bundle)


def test_a_chunk_two_files_share_is_copied_once_and_written_to_both(
    tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = make_sources(tmp_path, random_mib=2)
    shutil.copyfile(models / "weights.bin", models / "same.bin")
    build(tmp_path, recipe=write_recipe(tmp_path, files=("weights.bin", "same.bin")))
    copies = _count(monkeypatch, "copy_file_range")
    result = import_media(store, [tmp_path / "media"], now=NOW)
    assert copies
    assert result.media_bytes == 2 * MIB and result.local_bytes == 2 * MIB  # the second copy
    _assert_imported(store, tmp_path)


@pytest.mark.parametrize("code", [errno.EXDEV, errno.EINVAL, errno.ENOSYS])
def test_copy_file_range_refused_falls_back_to_splice(
    raw_bundle: Path, store: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    copies = _count(monkeypatch, "copy_file_range", _refuse(code))
    splices = _count(monkeypatch, "splice")
    import_media(store, [raw_bundle / "media"], now=NOW)
    assert copies and splices
    _assert_imported(store, raw_bundle)


def test_no_kernel_copy_at_all_falls_back_to_pread(
    raw_bundle: Path, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copies = _count(monkeypatch, "copy_file_range", _refuse(errno.EXDEV))
    splices = _count(monkeypatch, "splice", _refuse(errno.EINVAL))
    import_media(store, [raw_bundle / "media"], now=NOW)
    assert copies and splices
    _assert_imported(store, raw_bundle)


def test_copy_range_stops_where_the_source_ends(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"a" * 1000)
    dst.write_bytes(b"\0" * 2000)
    with src.open("rb") as s, dst.open("r+b") as d:
        assert kernelcopy.copy_range(s.fileno(), d.fileno(), 800, 600, 100) == 400
    assert dst.read_bytes() == b"\0" * 100 + b"a" * 400 + b"\0" * 1500


def _raw_chunk(media: Path) -> tuple[str, Path, int, int]:
    """Digest, pack, offset and length of the largest chunk stored raw on the media."""
    opened = open_media([media])
    opened.authenticate(trusted(), NOW)
    best: tuple[str, Path, int, int] | None = None
    for ref in opened.parse_unverified().unique_chunks():
        location = opened.locations(ref.digest)[0]
        if not location.compressed and (best is None or ref.length > best[3]):
            best = (ref.digest, location.pack, location.offset, ref.length)
    assert best is not None and best[3] >= kernelcopy.MIN_KERNEL_COPY
    return best


@pytest.mark.parametrize("kernel", [True, False], ids=["copy_file_range", "pread"])
def test_tampered_raw_chunk_is_refused_not_recorded_not_published(
    raw_bundle: Path, store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    kernel: bool
) -> None:
    media = tmp_path / "media"
    shutil.copytree(raw_bundle / "media", media)
    digest, pack, offset, length = _raw_chunk(media)
    flip_byte(pack, offset + length // 2)
    copies = _count(monkeypatch, "copy_file_range", None if kernel else _refuse(errno.EXDEV))
    if not kernel:
        _count(monkeypatch, "splice", _refuse(errno.EINVAL))
    with pytest.raises(IntegrityError) as info:
        import_media(store, [media], now=NOW)
    assert copies
    assert info.value.chunk == digest
    assert info.value.volume == "vol-001" and info.value.offset == offset
    assert pack.name in str(info.value)
    conn = connect(store)
    try:
        done = conn.execute("SELECT done FROM chunks WHERE digest = ?", (digest,)).fetchall()
        published = conn.execute("SELECT COUNT(*) AS n FROM files WHERE state = 'published'"
                                 ).fetchone()["n"]
    finally:
        conn.close()
    assert done and all(r["done"] == 0 for r in done)
    assert published == 0
    assert list_models(store) == []
    assert list((store / "models").rglob("*.bin")) == []
