"""Parity volumes: a 3+1 bundle imports and verifies with any one volume absent or damaged."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tracemalloc
from pathlib import Path

import pytest
from bundle_helpers import MIB, NOW, build, flip_byte, make_sources, root_file, trusted
from trust_helpers import trusted_store

from appliance.bundle.media import MANIFEST_NAME
from appliance.bundle.parity import write_parity
from appliance.bundle.parity_layout import PARITY_NAME
from appliance.bundle.parity_rebuild import (
    import_media_with_parity,
    restore,
    verify_media_with_parity,
)
from appliance.bundle.reader import open_media
from appliance.bundle.sbom import bundle_sbom
from appliance.bundle.sheet import approval_sheet
from appliance.bundle.verify import verify_media
from appliance.cli.main import main
from appliance.errors import EXIT_OK, IntegrityError, MissingVolumeError, UsageError
from appliance.limits import DEFAULT_LIMITS
from appliance.store.layout import published_path

VOLUME = 12 * MIB  # the builder keeps ~6 MiB per volume for metadata: one 4 MiB chunk each


@pytest.fixture()
def parity_build(tmp_path: Path) -> Path:
    make_sources(tmp_path, random_mib=12)
    result = build(tmp_path, volume_size=VOLUME, parity=1)
    assert [v.name for v in result.volumes] == ["vol-001", "vol-002", "vol-003"]
    assert [p.name for p in result.parity_volumes] == ["par-001"]
    assert result.manifest.parity is not None and result.manifest.parity.data_volumes == 3
    return tmp_path


def _store_matches_sources(store: Path, base: Path) -> None:
    for name in ("weights.bin", "notes.txt"):
        stored = published_path(store, "acme/tiny", "q4_k_m", name).read_bytes()
        source = (base / "models" / name).read_bytes()
        assert hashlib.sha256(stored).digest() == hashlib.sha256(source).digest()


@pytest.mark.parametrize("lost", ["vol-001", "vol-002", "vol-003"])
def test_import_with_any_one_volume_absent(parity_build: Path, lost: str) -> None:
    shutil.move(parity_build / "media" / lost, parity_build / "elsewhere")
    store = trusted_store(parity_build / "store")
    result = import_media_with_parity(store, [parity_build / "media"], now=NOW)
    assert result.complete and result.rebuilt == (lost,)
    _store_matches_sources(store, parity_build)
    assert not list(store.glob(".parity-rebuild-*"))  # scratch removed


@pytest.mark.parametrize("damaged", ["vol-001", "vol-003"])
def test_import_with_a_damaged_volume_rebuilds_it(parity_build: Path, damaged: str) -> None:
    flip_byte(parity_build / "media" / damaged / "packs" / "pack-0001.zst", 1000)
    store = trusted_store(parity_build / "store")
    with pytest.raises(IntegrityError):  # without parity the damage stops the import
        verify_media([parity_build / "media"], trusted(), NOW)
    result = import_media_with_parity(store, [parity_build / "media"], now=NOW)
    assert result.complete and result.rebuilt == (damaged,)
    _store_matches_sources(store, parity_build)


def test_a_volume_with_a_damaged_index_counts_as_missing(parity_build: Path) -> None:
    flip_byte(parity_build / "media/vol-002/index.bin", 100)
    report = verify_media_with_parity([parity_build / "media"], trusted(), NOW)
    assert report.complete and report.rebuilt == ("vol-002",)


def test_verify_rebuilds_and_reads_every_parity_byte(parity_build: Path) -> None:
    report = verify_media_with_parity([parity_build / "media"], trusted(), NOW)
    assert report.complete and report.rebuilt == ()
    parity_bytes = (parity_build / "media/par-001" / PARITY_NAME).stat().st_size
    assert report.stored_bytes >= parity_bytes
    shutil.rmtree(parity_build / "media/vol-002")
    report = verify_media_with_parity([parity_build / "media"], trusted(), NOW)
    assert report.complete and report.rebuilt == ("vol-002",)


def test_tampered_parity_volume_is_refused(parity_build: Path) -> None:
    parity = parity_build / "media/par-001" / PARITY_NAME
    flip_byte(parity, parity.stat().st_size - 10)
    with pytest.raises(IntegrityError, match="par-001"):
        verify_media_with_parity([parity_build / "media"], trusted(), NOW)
    shutil.rmtree(parity_build / "media/vol-001")
    store = trusted_store(parity_build / "store")
    with pytest.raises(IntegrityError, match="par-001"):
        import_media_with_parity(store, [parity_build / "media"], now=NOW)


def test_two_volumes_lost_with_one_parity_is_missing_volume(parity_build: Path) -> None:
    shutil.rmtree(parity_build / "media/vol-001")
    shutil.rmtree(parity_build / "media/vol-003")
    with pytest.raises(MissingVolumeError, match="1 more volume"):
        restore([parity_build / "media"], trusted(), NOW, parity_build / "scratch")


def test_parity_volume_alone_carries_what_authenticates(parity_build: Path) -> None:
    """A parity volume is self-describing: manifest, signatures, trust chain, index copies."""
    par = parity_build / "media/par-001"
    assert (par / MANIFEST_NAME).read_bytes() == (parity_build / "media/vol-001" / MANIFEST_NAME
                                                  ).read_bytes()
    assert sorted(p.name for p in (par / "indexes").iterdir()) == [
        "vol-001.bin", "vol-002.bin", "vol-003.bin"]
    restored = restore([parity_build / "media/vol-001", parity_build / "media/vol-003", par],
                       trusted(), NOW, parity_build / "scratch")
    assert restored.rebuilt == ("vol-002",)
    assert [p.name for p in restored.dirs] == ["vol-001", "vol-002", "vol-003"]


def test_rebuild_memory_stays_flat(tmp_path: Path) -> None:
    make_sources(tmp_path, random_mib=40)
    build(tmp_path, volume_size=32 * MIB, parity=1)  # volumes of ~26 MiB
    shutil.rmtree(tmp_path / "media/vol-001")
    # Small caps: fsutil.read_capped asks os.read for up to the cap once (untouched memory,
    # but tracemalloc counts it), which would hide what the rebuild itself holds.
    limits = dataclasses.replace(DEFAULT_LIMITS, max_volume_index_bytes=MIB,
                                 max_manifest_bytes=MIB)
    tracemalloc.start()
    try:
        restored = restore([tmp_path / "media"], trusted(), NOW, tmp_path / "scratch",
                           limits=limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert restored.rebuilt == ("vol-001",)
    # Encoding is as flat: parity over the three volumes (one rebuilt) again.
    staging = tmp_path / "again"
    staging.mkdir()
    data = [tmp_path / "scratch/vol-001", tmp_path / "media/vol-002"]
    tracemalloc.start()
    try:
        section, _ = write_parity(data, staging, 1)
        _, encode_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # A few stripes in flight (2 read ahead, 2 being coded, 2 being written; a stripe here is
    # 2 MiB in and 1 MiB out), not the 52 MiB of the volumes.
    assert section.stripes >= 20 and encode_peak < 16 * MIB
    rebuilt = sum(p.stat().st_size for p in (tmp_path / "scratch/vol-001").rglob("*"))
    assert rebuilt > 20 * MIB
    assert peak < 8 * MIB  # a few 1 MiB blocks, not the volume


def test_bundle_without_parity_has_no_parity_field(tmp_path: Path) -> None:
    make_sources(tmp_path, random_mib=1)
    result = build(tmp_path)
    assert result.manifest.parity is None and result.parity_volumes == ()
    assert b"parity" not in (tmp_path / "media" / MANIFEST_NAME).read_bytes()
    with pytest.raises(UsageError, match="--volume-size"):
        build(tmp_path, out="media2", parity=1)


def test_cli_build_parity_and_verify_says_rebuilt(parity_build: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(parity_build / "media/vol-003")
    code = main(["bundle", "verify", str(parity_build / "media"),
                 "--trust", str(root_file(parity_build))])
    out = capsys.readouterr().out
    assert code == EXIT_OK
    assert "rebuilt from parity: vol-003" in out
    code = main(["bundle", "verify", str(parity_build / "media"),
                 "--trust", str(root_file(parity_build)), "--json"])
    assert code == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["rebuilt"] == ["vol-003"]


def test_sheet_and_bom_tell_of_parity(parity_build: Path) -> None:
    media = open_media([parity_build / "media"])
    sheet = approval_sheet(media, media.parse_unverified(), verified=False)
    assert "on 3 volume(s) + 1 parity volume(s): any 1 lost can be rebuilt" in sheet
    bom = json.loads(bundle_sbom(media, media.parse_unverified(), verified=False))
    assert {"name": "appliance:parity-volumes", "value": "1"} in bom["metadata"]["component"][
        "properties"]


def test_two_parity_volumes_rebuild_two_lost_volumes(tmp_path: Path) -> None:
    make_sources(tmp_path, random_mib=12)
    result = build(tmp_path, volume_size=VOLUME, parity=2)
    assert [p.name for p in result.parity_volumes] == ["par-001", "par-002"]
    shutil.rmtree(tmp_path / "media/vol-001")
    shutil.rmtree(tmp_path / "media/vol-003")
    report = verify_media_with_parity([tmp_path / "media"], trusted(), NOW)
    assert report.complete and report.rebuilt == ("vol-001", "vol-003")
    shutil.rmtree(tmp_path / "media/par-002")
    with pytest.raises(MissingVolumeError):
        verify_media_with_parity([tmp_path / "media"], trusted(), NOW)
