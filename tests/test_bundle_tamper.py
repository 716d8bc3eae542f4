"""The hostile-media table of issue 4: each tampering gives one exact error class.

Every test builds a real bundle, damages it the way media or an attacker would, and runs the
real reader. ``pytest.raises`` accepts subclasses, so each test also pins ``type(...)``.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from bundle_helpers import (
    NOW,
    build,
    flip_byte,
    make_sources,
    rewrite_manifest,
    trusted,
)
from trust_helpers import kid, make_root, private

from appliance.bundle.media import parse_index
from appliance.bundle.reader import open_media
from appliance.bundle.recipe import parse_size
from appliance.bundle.signers import add_signature
from appliance.bundle.verify import verify_media
from appliance.errors import (
    ApplianceError,
    DecompressionError,
    FormatError,
    IntegrityError,
    LimitExceededError,
    MissingVolumeError,
    SignatureError,
    ThresholdError,
    TruncatedError,
    UnsafePathError,
)
from appliance.limits import Limits


@pytest.fixture()
def media(tmp_path: Path) -> Path:
    make_sources(tmp_path)
    build(tmp_path)
    return tmp_path / "media"


def refused(media: Path, *, limits: Limits | None = None) -> ApplianceError:
    with pytest.raises(ApplianceError) as info:
        if limits is None:
            verify_media([media], trusted(), NOW)
        else:
            verify_media([media], trusted(), NOW, limits=limits)
    return info.value


def _entries(media: Path) -> list:  # type: ignore[type-arg]
    return list(parse_index((media / "index.bin").read_bytes()).entries)


def test_flipped_byte_in_a_raw_chunk(media: Path) -> None:
    entry = next(e for e in _entries(media) if not e.compressed)
    flip_byte(media / "packs" / "pack-0001.zst", entry.offset + entry.stored_length // 2)
    error = refused(media)
    assert type(error) is IntegrityError
    assert error.chunk == entry.digest.hex()  # type: ignore[attr-defined]
    assert error.volume == "vol-001" and error.offset == entry.offset  # type: ignore[attr-defined]
    assert error.file == "acme/tiny/weights.bin"  # type: ignore[attr-defined]
    assert "pack-0001.zst" in str(error)


def test_flipped_byte_in_a_compressed_chunk(media: Path) -> None:
    entry = next(e for e in _entries(media) if e.compressed)
    flip_byte(media / "packs" / "pack-0001.zst", entry.offset + 6)  # the content-size field
    assert type(refused(media)) is DecompressionError


def test_flipped_byte_in_the_manifest(media: Path) -> None:
    flip_byte(media / "manifest.yaml", 40)
    assert type(refused(media)) is ThresholdError


def test_flipped_bit_in_a_signature(media: Path) -> None:
    (sig_file,) = (media / "signatures").iterdir()
    magic, key, encoded = sig_file.read_text().split()
    raw = bytearray(base64.b64decode(encoded))
    raw[10] ^= 0x01
    sig_file.write_text(f"{magic} {key} {base64.b64encode(bytes(raw)).decode()}\n")
    assert type(refused(media)) is ThresholdError


def test_garbled_signature_file(media: Path) -> None:
    (sig_file,) = (media / "signatures").iterdir()
    sig_file.write_bytes(sig_file.read_bytes().replace(b"appliance-sig-v1", b"appliance-sig-v9"))
    assert type(refused(media)) is SignatureError


def test_signature_file_named_for_another_key(media: Path) -> None:
    (sig_file,) = (media / "signatures").iterdir()
    sig_file.rename(sig_file.with_name(f"{kid('p2')}.sig"))
    assert type(refused(media)) is SignatureError


def test_flipped_byte_in_the_volume_index(media: Path) -> None:
    flip_byte(media / "index.bin", 100)
    assert type(refused(media)) is FormatError


def test_flipped_byte_in_a_pack_anywhere(media: Path) -> None:
    pack = media / "packs" / "pack-0001.zst"
    for offset in range(0, pack.stat().st_size, pack.stat().st_size // 7):
        flip_byte(pack, offset)
        assert isinstance(refused(media), IntegrityError)
        flip_byte(pack, offset)
    verify_media([media], trusted(), NOW)


def test_truncated_pack(media: Path) -> None:
    pack = media / "packs" / "pack-0001.zst"
    with pack.open("r+b") as f:
        f.truncate(pack.stat().st_size - 1000)
    assert type(refused(media)) is TruncatedError


def test_missing_pack(media: Path) -> None:
    (media / "packs" / "pack-0001.zst").unlink()
    assert type(refused(media)) is TruncatedError


def test_pack_with_extra_bytes(media: Path) -> None:
    with (media / "packs" / "pack-0001.zst").open("ab") as f:
        f.write(b"surprise")
    assert type(refused(media)) is FormatError


def test_missing_volume(tmp_path: Path) -> None:
    make_sources(tmp_path, random_mib=30)
    result = build(tmp_path, volume_size=parse_size("20M"))
    media = open_media([result.volumes[0]])
    bundle = media.authenticate(trusted(), NOW)
    last = bundle.manifest.unique_chunks()[-1]
    with pytest.raises(MissingVolumeError) as info:
        media.locations(last.digest)
    assert type(info.value) is MissingVolumeError


def test_unknown_key(tmp_path: Path) -> None:
    make_sources(tmp_path)
    build(tmp_path)
    add_signature(tmp_path / "media", private("mallory"))
    for sig in (tmp_path / "media" / "signatures").iterdir():
        if sig.name != f"{kid('mallory')}.sig":
            sig.unlink()
    assert type(refused(tmp_path / "media")) is ThresholdError


def test_wrong_key_a_root_key_signing_a_bundle(media: Path) -> None:
    rewrite_manifest(media, (media / "manifest.yaml").read_bytes(), signers=("r1", "r2"))
    assert type(refused(media)) is ThresholdError


def test_fewer_signatures_than_the_threshold(tmp_path: Path) -> None:
    make_sources(tmp_path)
    root = make_root(publisher_threshold=2)
    build(tmp_path, root=root)
    with pytest.raises(ThresholdError) as info:
        verify_media([tmp_path / "media"], trusted(root), NOW)
    assert type(info.value) is ThresholdError


def test_manifest_over_the_size_cap(media: Path) -> None:
    size = (media / "manifest.yaml").stat().st_size
    error = refused(media, limits=Limits(max_manifest_bytes=size - 1))
    assert type(error) is LimitExceededError


def test_signed_manifest_with_yaml_aliases(media: Path) -> None:
    data = (media / "manifest.yaml").read_bytes().replace(
        b"license: apache-2.0", b"license: &lic apache-2.0\n  alias: *lic")
    rewrite_manifest(media, data)
    assert type(refused(media)) is FormatError


@pytest.mark.parametrize("bad", ["/etc/passwd", "../../escape.bin", "a/../../b.bin"])
def test_signed_manifest_with_unsafe_paths(media: Path, bad: str) -> None:
    data = (media / "manifest.yaml").read_bytes().replace(b"weights.bin", bad.encode())
    rewrite_manifest(media, data)
    assert type(refused(media)) is UnsafePathError


def test_signed_manifest_with_duplicate_paths(media: Path) -> None:
    data = (media / "manifest.yaml").read_bytes().replace(b"notes.txt", b"weights.bin")
    rewrite_manifest(media, data)
    assert type(refused(media)) is UnsafePathError


def test_signed_manifest_with_a_size_that_lies(media: Path) -> None:
    manifest = (media / "manifest.yaml").read_bytes()
    lines = manifest.split(b"\n")
    i = next(i for i, line in enumerate(lines) if line.strip().startswith(b"size:"))
    value = int(lines[i].split(b":")[1])
    lines[i] = lines[i].replace(str(value).encode(), str(value + 1).encode())
    rewrite_manifest(media, b"\n".join(lines))
    assert type(refused(media)) is FormatError


def test_index_with_a_stored_length_that_lies(media: Path) -> None:
    """A re-sealed index whose entry claims more bytes than the chunk holds."""
    import blake3

    body = bytearray((media / "index.bin").read_bytes()[:-32])
    entries = _entries(media)
    raw = next(i for i, e in enumerate(entries) if not e.compressed)
    header = 72 + 8 * 1 + 8 * 1
    pos = header + 49 * raw + 44
    body[pos:pos + 4] = (entries[raw].stored_length - 1).to_bytes(4, "little")
    (media / "index.bin").write_bytes(bytes(body) + blake3.blake3(bytes(body)).digest())
    assert type(refused(media)) is FormatError


def test_chunk_count_over_the_limit(media: Path) -> None:
    assert type(refused(media, limits=Limits(max_chunks_per_file=1))) is LimitExceededError


def test_index_over_the_size_cap(media: Path) -> None:
    size = (media / "index.bin").stat().st_size
    error = refused(media, limits=Limits(max_volume_index_bytes=size - 1))
    assert type(error) is LimitExceededError


def test_volumes_with_different_manifests(tmp_path: Path) -> None:
    make_sources(tmp_path, random_mib=30)
    result = build(tmp_path, volume_size=parse_size("20M"))
    flip_byte(result.volumes[1] / "manifest.yaml", 30)
    with pytest.raises(FormatError) as info:
        open_media(list(result.volumes))
    assert type(info.value) is FormatError
