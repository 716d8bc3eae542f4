"""Verifying media: trust order, volumes in any order, chunk reads, the real gemma model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from bundle_helpers import (
    NOW,
    build,
    make_sources,
    trusted,
)
from trust_helpers import DAY, kid, make_root, private

from appliance.bundle.reader import open_media, read_chunk
from appliance.bundle.recipe import parse_size
from appliance.bundle.signers import add_signature
from appliance.bundle.verify import verify_media
from appliance.errors import (
    ExpiredError,
    MissingVolumeError,
    ScopeError,
    ThresholdError,
    UsageError,
)


def _split_build(tmp_path: Path) -> list[Path]:
    make_sources(tmp_path, random_mib=30)
    result = build(tmp_path, volume_size=parse_size("20M"))
    assert len(result.volumes) == 3
    return list(result.volumes)


def test_verify_reports_counts_and_progress(tmp_path: Path) -> None:
    make_sources(tmp_path)
    result = build(tmp_path)
    seen: list[tuple[int, int]] = []
    report = verify_media([tmp_path / "media"], trusted(), NOW,
                          progress=lambda d, t: seen.append((d, t)))
    assert report.complete and report.volumes_present == ("vol-001",)
    assert report.chunks_verified == result.unique_chunk_count
    assert report.plain_bytes == result.unique_bytes
    assert report.stored_bytes == result.stored_bytes
    assert report.bundle.signers == frozenset({kid("p1")})
    assert report.bundle.manifest == result.manifest
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert seen[-1] == (result.stored_bytes, result.stored_bytes)


def test_volumes_in_reverse_order_reassemble_every_file(tmp_path: Path) -> None:
    volumes = _split_build(tmp_path)
    report = verify_media(list(reversed(volumes)), trusted(), NOW, workers=3)
    assert report.complete and report.volumes_present == ("vol-001", "vol-002", "vol-003")
    media = open_media(list(reversed(volumes)))
    bundle = media.authenticate(trusted(), NOW)
    for model in bundle.manifest.models:
        for file in model.files:
            data = b"".join(
                read_chunk(media.locations(c.digest)[0], c, file=file.path) for c in file.chunks
            )
            assert data == (tmp_path / "models" / file.path).read_bytes()


def test_a_chunk_on_an_absent_volume_names_that_volume(tmp_path: Path) -> None:
    volumes = _split_build(tmp_path)
    media = open_media([volumes[0], volumes[2]])
    assert media.volumes_missing == ["vol-002"]
    bundle = media.authenticate(trusted(), NOW)
    on_first = media.volumes[0].index.entries[0].digest
    assert media.locations(on_first.hex())[0].volume == "vol-001"
    unique = bundle.manifest.unique_chunks()
    second_share = media.volumes[1].index.volume_starts[1]
    with pytest.raises(MissingVolumeError, match="vol-002"):
        media.locations(unique[second_share].digest)
    report = verify_media([volumes[2]], trusted(), NOW)
    assert report.volumes_missing == ("vol-001", "vol-002") and not report.complete


def test_the_media_dir_finds_its_volumes(tmp_path: Path) -> None:
    _split_build(tmp_path)
    assert open_media([tmp_path / "media"]).volumes_present == ["vol-001", "vol-002", "vol-003"]


def test_the_same_volume_twice(tmp_path: Path) -> None:
    volumes = _split_build(tmp_path)
    assert open_media([volumes[0], volumes[0]]).volumes_present == ["vol-001"]
    copy = tmp_path / "copy-of-vol-001"
    shutil.copytree(volumes[0], copy)
    with pytest.raises(UsageError, match="given twice"):
        open_media([volumes[0], copy])


def test_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        open_media([tmp_path / "nowhere"])


def test_signatures_are_checked_before_the_manifest_is_parsed(tmp_path: Path) -> None:
    make_sources(tmp_path)
    build(tmp_path)
    (tmp_path / "media" / "manifest.yaml").write_bytes(b"{{{ not yaml at all")
    media = open_media([tmp_path / "media"])
    with pytest.raises(ThresholdError):
        media.authenticate(trusted(), NOW)


def test_threshold_two_needs_a_cosigner(tmp_path: Path) -> None:
    make_sources(tmp_path)
    root = make_root(publisher_threshold=2)
    build(tmp_path, root=root)
    with pytest.raises(ThresholdError):
        verify_media([tmp_path / "media"], trusted(root), NOW)
    add_signature(tmp_path / "media", private("p1"))  # the same key again counts once
    with pytest.raises(ThresholdError):
        verify_media([tmp_path / "media"], trusted(root), NOW)
    add_signature(tmp_path / "media", private("p2"))
    report = verify_media([tmp_path / "media"], trusted(root), NOW)
    assert report.bundle.signers == frozenset({kid("p1"), kid("p2")})


def test_carried_rotation_reaches_a_new_publisher(tmp_path: Path) -> None:
    make_sources(tmp_path)
    v1 = make_root()
    v2 = make_root(version=2, publishers={"p3": ("acme/*",)})
    build(tmp_path, keys=("p3",), chain=[v1, v2])
    report = verify_media([tmp_path / "media"], trusted(v1), NOW)
    assert report.bundle.root.version == 2
    assert len(report.bundle.chain) == 2


def test_publisher_outside_its_scope_is_refused(tmp_path: Path) -> None:
    make_sources(tmp_path)
    root = make_root(publishers={"p1": ("other/*",)})
    build(tmp_path, root=root)
    with pytest.raises(ScopeError):
        verify_media([tmp_path / "media"], trusted(root), NOW)


def test_expired_bundle_is_refused_unless_allowed(tmp_path: Path) -> None:
    make_sources(tmp_path)
    build(tmp_path)
    later = NOW + 31 * DAY
    with pytest.raises(ExpiredError, match="2030-07-01T12:00:00Z"):
        verify_media([tmp_path / "media"], trusted(), later)
    report = verify_media([tmp_path / "media"], trusted(), later, allow_expired=True)
    assert report.bundle.expired_override
    assert not verify_media([tmp_path / "media"], trusted(), NOW).bundle.expired_override


@pytest.mark.slow
def test_real_gemma_bundle_builds_and_verifies(tmp_path: Path, gemma_gguf: Path) -> None:
    recipe = tmp_path / "gemma.yaml"
    recipe.write_text(
        "channel: default-models\nsequence: 1\nmodels:\n  - name: gemma3-270m\n"
        "    version: q4_k_m\n    license: gemma\n    files:\n"
        f"      - path: {gemma_gguf}\n"
    )
    result = build(tmp_path, recipe=recipe, volume_size=parse_size("150M"))
    assert len(result.volumes) == 2
    (model,) = result.manifest.models
    assert model.gguf is not None and model.gguf.architecture == "gemma3"
    assert model.files[0].size == 253_113_024
    assert model.provenance.sources[0].sha256.startswith("a5fd3b62")
    # The header (6.5 MB of vocabulary) is cut into many pieces, not one block.
    first_tensor_chunk = next(i for i, c in enumerate(model.files[0].chunks)
                              if c.offset >= 6_000_000)
    assert first_tensor_chunk > 8
    report = verify_media(list(reversed(result.volumes)), trusted(), NOW)
    assert report.complete and report.plain_bytes == result.unique_bytes
    media = open_media(result.volumes)
    media.authenticate(trusted(), NOW)
    out = tmp_path / "reassembled.gguf"
    with out.open("wb") as f:
        for chunk in model.files[0].chunks:
            f.write(read_chunk(media.locations(chunk.digest)[0], chunk))
    assert out.read_bytes() == gemma_gguf.read_bytes()
